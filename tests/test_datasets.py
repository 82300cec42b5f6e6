import numpy as np
import pytest
from PIL import Image

from e4tcli.datasets import ImageFolder
from e4tcli.errors import UsageError


def save(path, array, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)


def test_recursive_formats_exif_and_bad_files(tmp_path):
    red = np.zeros((8, 16, 3), np.uint8)
    red[..., 0] = 255
    save(tmp_path / "a.png", red)
    save(tmp_path / "sub" / "b.JPG", red)
    save(tmp_path / "sub" / "deeper" / "c.webp", red)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise on display
    save(tmp_path / "rotated.jpg", red, exif=exif)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")

    folder = ImageFolder(tmp_path)
    assert len(folder) == 4
    assert [p.name for p in folder.skipped] == ["broken.png"]
    sizes = {p.name: folder[i].size for i, p in enumerate(folder.paths)}
    assert sizes["a.png"] == (16, 8)
    assert sizes["rotated.jpg"] == (8, 16)
    assert all(folder[i].mode == "RGB" for i in range(len(folder)))


def test_file_failing_at_decode_time_is_skipped_and_counted(tmp_path):
    save(tmp_path / "good.png", np.full((4, 4, 3), 7, np.uint8))
    save(tmp_path / "truncated.png", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = (tmp_path / "truncated.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    folder = ImageFolder(tmp_path)
    images = [folder[i] for i in range(len(folder))]
    assert all(np.asarray(im).max() == 7 for im in images)
    assert [p.name for p in folder.skipped] == ["truncated.png"]


def test_missing_or_empty_folder_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        ImageFolder(tmp_path / "nope")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(UsageError, match="no readable images"):
        ImageFolder(tmp_path)


def test_metadata_jsonl_gives_each_image_its_own_fields(tmp_path):
    """Fields follow the image actually read: a file that fails to decode is replaced by the next one,
    and the prompt must then use the replacement's fields."""
    from e4tcli.training.pretrain import sample_prompt

    save(tmp_path / "a.png", np.full((4, 4, 3), 10, np.uint8))
    save(tmp_path / "sub" / "b.png", np.full((4, 4, 3), 20, np.uint8))
    save(tmp_path / "sub" / "c.png", np.full((4, 4, 3), 30, np.uint8))
    (tmp_path / "metadata.jsonl").write_text(
        '{"file_name": "a.png", "background": "red"}\n\n{"file_name": "sub/b.png", "background": "dark_blue"}\n'
    )
    folder = ImageFolder(tmp_path)
    by_name = {p.name: i for i, p in enumerate(folder.paths)}
    assert folder.metadata(by_name["a.png"]) == {"background": "red"}
    assert folder.metadata(by_name["c.png"]) == {}, "an image the file does not list has no fields"
    image, fields = folder.sample(by_name["b.png"])
    assert np.asarray(image).max() == 20 and fields == {"background": "dark_blue"}
    template = "S* on a {background} background"
    assert sample_prompt(template, fields, "S*") == "S* on a dark blue background"
    assert sample_prompt(template, folder.metadata(by_name["c.png"]), "S*") == "S*"

    noisy = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    save(tmp_path / "a.png", noisy)
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "a.png").write_bytes(data[: len(data) // 2])
    image, fields = folder.sample(by_name["a.png"])  # sorted paths: a.png, sub/b.png, sub/c.png
    assert np.asarray(image).max() == 20 and fields == {"background": "dark_blue"}


def test_a_malformed_metadata_line_is_a_usage_error_naming_the_line(tmp_path):
    save(tmp_path / "a.png", np.full((4, 4, 3), 10, np.uint8))
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png"}\n{"style": "no file name"}\n')
    with pytest.raises(UsageError, match="metadata.jsonl, line 2"):
        ImageFolder(tmp_path)
    for line in ('{"file_name": 7}', '["a.png"]', "not json"):
        (tmp_path / "metadata.jsonl").write_text(line + "\n")
        with pytest.raises(UsageError, match="metadata.jsonl, line 1"):
            ImageFolder(tmp_path)
