"""Real dataset formats: LSUN-style LMDB, webdataset tar shards, WikiArt folders + CSV, and dispatch."""

import hashlib
import io
import json
import pickle
import tarfile

import numpy as np
import pytest
import skimage.data
from PIL import Image

from e4tcli.datasets import (
    ImageFolder,
    LmdbImages,
    TarShards,
    WikiArt,
    any_images,
    expand_braces,
    looks_like_shards,
)
from e4tcli.errors import UsageError

PHOTOS = ("chelsea", "astronaut", "coffee", "rocket", "cat")


@pytest.fixture(scope="module")
def photos():
    """Real photos shipped with scikit-image, halved to keep the test fast."""
    out = {}
    for name in PHOTOS:
        image = Image.fromarray(getattr(skimage.data, name)())
        out[name] = image.resize((image.width // 2, image.height // 2))
    return out


def encode(image, fmt="JPEG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def rotated_exif_jpeg(image) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    return encode(image, exif=exif)


def same_picture(a, b) -> bool:
    """Equal up to JPEG/WebP loss."""
    return a.size == b.size and np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean() < 6


# ---------------------------------------------------------------- LMDB (LSUN)


def lsun_key(name: str) -> bytes:
    return hashlib.sha1(name.encode()).hexdigest().encode()  # LSUN keys are hex image ids


@pytest.fixture()
def lmdb_folder(tmp_path, photos):
    import lmdb

    records = [
        (lsun_key("chelsea"), encode(photos["chelsea"], "WEBP", quality=90)),
        (lsun_key("coffee"), encode(photos["coffee"], quality=90)),
        (lsun_key("broken"), encode(photos["rocket"])[:600]),  # a truncated JPEG
        (lsun_key("astronaut"), rotated_exif_jpeg(photos["astronaut"])),
        (lsun_key("cat"), encode(photos["cat"], quality=90)),
    ]
    folder = tmp_path / "cat"
    env = lmdb.open(str(folder), map_size=64 << 20)
    with env.begin(write=True) as txn:
        for key, value in records:
            txn.put(key, value)
    env.close()
    return folder, dict(records)


def test_lmdb_reads_every_record_and_skips_the_corrupt_one(lmdb_folder, photos):
    folder, records = lmdb_folder
    data = LmdbImages(folder)
    assert len(data) == 5
    keys = [data.key(i) for i in range(len(data))]
    assert keys == sorted(records)  # LMDB keeps keys sorted
    by_key = {data.key(i): data[i] for i in range(len(data))}
    assert data.skipped == [lsun_key("broken")]
    assert all(image.mode == "RGB" for image in by_key.values())
    assert same_picture(by_key[lsun_key("chelsea")], photos["chelsea"])  # WebP
    assert same_picture(by_key[lsun_key("coffee")], photos["coffee"])  # JPEG
    w, h = photos["astronaut"].size
    assert by_key[lsun_key("astronaut")].size == (h, w)  # EXIF orientation applied
    # the corrupt record is replaced by the next readable one, and sample() says which it was
    broken = keys.index(lsun_key("broken"))
    image, meta = data.sample(broken)
    assert meta["key"] == keys[(broken + 1) % 5].decode() and same_picture(image, by_key[keys[(broken + 1) % 5]])


def first_size(data):
    return data[0].size


def test_lmdb_pickles_and_forks_for_workers_and_opens_data_mdb_directly(lmdb_folder):
    import multiprocessing

    folder, _ = lmdb_folder
    data = LmdbImages(folder)
    first = data[0]  # the parent opens the environment before the fork
    clone = pickle.loads(pickle.dumps(data))
    assert np.array_equal(np.asarray(clone[0]), np.asarray(first))
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply(first_size, (data,)) == first.size
    assert np.array_equal(np.asarray(data[0]), np.asarray(first))  # the parent's handle survived the child
    assert len(LmdbImages(folder / "data.mdb")) == 5


def test_lmdb_bad_paths_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="no LMDB database"):
        LmdbImages(tmp_path)
    import lmdb

    lmdb.open(str(tmp_path / "empty")).close()
    with pytest.raises(UsageError, match="empty"):
        LmdbImages(tmp_path / "empty")


# ---------------------------------------------------------------- tar shards


def add(archive, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


@pytest.fixture()
def shard_folder(tmp_path, photos):
    """Three shards: nested keys, json/txt beside images, a corrupt jpg, a sample without image."""
    folder = tmp_path / "shards"
    folder.mkdir()
    layout = [
        [("chelsea", "jpg"), ("coffee", "webp")],
        [("broken", "jpg"), ("part/astronaut", "png")],
        [("rocket", "jpeg"), ("cat", "jpg")],
    ]
    for number, samples in enumerate(layout):
        with tarfile.open(folder / f"shards-{number:03d}.tar", "w") as archive:
            for key, ext in samples:
                name = key.split("/")[-1]
                if name == "broken":
                    data = b"\xff\xd8\xff\xe0 not really a jpeg"
                else:
                    data = encode(photos[name], {"jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP", "png": "PNG"}[ext])
                add(archive, f"{key}.{ext}", data)
                add(archive, f"{key}.json", json.dumps({"name": name, "shard": "from json"}).encode())
                add(archive, f"{key}.txt", f"a photo of {name}".encode())
            add(archive, f"lonely{number}.json", b"{}")  # metadata without an image: not a sample
    return folder


def test_tar_shards_from_a_folder_with_metadata_and_a_corrupt_member(shard_folder, photos):
    data = TarShards(shard_folder)
    assert len(data) == 6
    assert data.keys == ["chelsea", "coffee", "broken", "part/astronaut", "rocket", "cat"]
    images = [data[i] for i in range(len(data))]
    assert data.skipped == ["shards-001.tar:broken"]
    assert same_picture(images[2], images[3])  # the broken one is replaced by the next sample
    for i, name in [(0, "chelsea"), (1, "coffee"), (3, "astronaut"), (4, "rocket"), (5, "cat")]:
        assert same_picture(images[i], photos[name]), name
    meta = data.metadata(3)
    assert meta == {
        "name": "astronaut",
        "txt": "a photo of astronaut",
        "key": "part/astronaut",
        "shard": "shards-001.tar",
    }
    assert data.sample(2)[1]["key"] == "part/astronaut"


def test_brace_patterns_single_tar_and_missing_shards(shard_folder):
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert expand_braces("plain{x}.tar") == ["plain{x}.tar"]
    assert len(TarShards(f"{shard_folder}/shards-{{000..002}}.tar")) == 6
    assert TarShards(f"{shard_folder}/shards-{{000..001}}.tar").keys == [
        "chelsea",
        "coffee",
        "broken",
        "part/astronaut",
    ]
    assert TarShards(shard_folder / "shards-002.tar").keys == ["rocket", "cat"]
    with pytest.raises(UsageError, match=r"tar shard not found: .*shards-003.tar \(2 of 5 missing\)"):
        TarShards(f"{shard_folder}/shards-{{000..004}}.tar")


def test_truncated_shard_keeps_what_came_before(shard_folder):
    path = shard_folder / "shards-002.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])  # cuts into the cat sample
    shards = TarShards(shard_folder)
    images = [shards[i] for i in range(len(shards))]
    assert all(image.mode == "RGB" for image in images)
    assert "rocket" in shards.keys
    assert any("shards-002.tar" in s for s in shards.skipped)


# ---------------------------------------------------------------- tar shards over HTTP


class ShardServer:
    """A local HTTP server for a folder, answering byte ranges as object stores do (or not, if told)."""

    def __init__(self, folder, ranges=True):
        import http.server
        import threading

        server = self
        self.requests = []
        self.ranges = ranges

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                path = folder / self.path.split("?")[0].lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                wanted = self.headers.get("Range")
                if server.ranges and wanted:
                    first, last = (int(v) for v in wanted.removeprefix("bytes=").split("-"))
                    last = min(last, len(data) - 1)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
                    data = data[first : last + 1]
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", f'"{path.stat().st_mtime_ns}"')
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def shard_server(shard_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("E4T_CACHE", str(tmp_path / "cache"))
    server = ShardServer(shard_folder)
    yield server
    server.close()


def test_remote_shards_read_like_local_ones_and_their_index_is_cached(shard_server, shard_folder):
    remote = TarShards(f"{shard_server.url}/shards-{{000..002}}.tar")
    local = TarShards(shard_folder)
    assert remote.keys == local.keys and len(remote) == 6
    for i in range(len(local)):
        assert np.array_equal(np.asarray(remote[i]), np.asarray(local[i]))
        assert remote.metadata(i) == local.metadata(i)
    assert remote.skipped == local.skipped == ["shards-001.tar:broken"]
    assert all(wanted and wanted.startswith("bytes=") for _, wanted in shard_server.requests)  # never a whole file

    shard_server.requests.clear()
    again = TarShards(f"{shard_server.url}/shards-{{000..002}}.tar")
    assert again.keys == remote.keys
    assert sorted(wanted for _, wanted in shard_server.requests) == ["bytes=0-0"] * 3  # one size check per shard

    (shard_folder / "shards-002.tar").write_bytes((shard_folder / "shards-000.tar").read_bytes())  # the shard changes
    assert TarShards(f"{shard_server.url}/shards-{{000..002}}.tar").keys[-2:] == ["chelsea", "coffee"]


def test_a_list_file_names_shards_such_as_presigned_urls(shard_server, shard_folder, tmp_path):
    listing = tmp_path / "list" / "shards.txt"
    listing.parent.mkdir()
    (tmp_path / "list" / "local-000.tar").write_bytes((shard_folder / "shards-000.tar").read_bytes())
    urls = [f"{shard_server.url}/shards-{n:03d}.tar?X-Amz-Signature=first{n}" for n in (1, 2)]
    listing.write_text("# shards of a run\nlocal-000.tar\n\n" + "\n".join(urls) + "\n")
    assert looks_like_shards(listing)
    listed = TarShards(listing)
    assert listed.keys == TarShards(shard_folder).keys
    assert listed.metadata(3)["shard"] == "shards-001.tar"
    assert np.array_equal(np.asarray(listed[4]), np.asarray(TarShards(shard_folder)[4]))

    shard_server.requests.clear()  # signed again: the index cache still holds
    listing.write_text("local-000.tar\n" + "\n".join(url.replace("first", "second") for url in urls))
    assert TarShards(listing).keys == listed.keys
    assert sorted(wanted for _, wanted in shard_server.requests) == ["bytes=0-0"] * 2
    listing.write_text("local-000.tar\nmissing-009.tar\n")
    with pytest.raises(UsageError, match="tar shard not found: .*missing-009.tar"):
        TarShards(listing)


def test_remote_shards_fail_clearly(shard_server, shard_folder):
    with pytest.raises(UsageError, match=r"tar shard not found: .*shards-003.tar \(HTTP 404\)"):
        TarShards(f"{shard_server.url}/shards-{{000..003}}.tar")
    with pytest.raises(UsageError, match="only .tar shards"):
        TarShards(f"{shard_server.url}/images/")
    shard_server.ranges = False
    with pytest.raises(UsageError, match="ignores Range requests"):
        TarShards(f"{shard_server.url}/shards-000.tar")


def test_a_server_that_goes_away_stops_the_run_instead_of_skipping_images(shard_server, monkeypatch):
    import e4tcli.datasets.remote as remote
    from e4tcli.errors import RuntimeFailure

    monkeypatch.setattr(remote, "RETRIES", 1)
    data = TarShards(f"{shard_server.url}/shards-{{000..002}}.tar")
    shard_server.close()
    with pytest.raises(RuntimeFailure, match="failed after 2 tries"):
        data[0]
    assert data.skipped == []

    from e4tcli.training.data import MicroBatches, loader, next_micro_batch, stop_workers
    from e4tcli.training.pretrain import PlannedSample

    batches = MicroBatches(data, lambda step: [PlannedSample(0, False, "S*", 0)], 1, 1, 1, 1, 0, 1, 16)
    iterator = iter(loader(batches, workers=1, pin_memory=False))
    try:
        with pytest.raises(RuntimeFailure) as raised:  # from a DataLoader worker: still the one-line error
            next_micro_batch(iterator)
    finally:
        stop_workers(iterator)  # as pretrain_domain does: the worker ignores SIGTERM and would outlive the test
    assert not any(worker.is_alive() for worker in iterator._workers)
    assert "\n" not in str(raised.value) and "failed after 2 tries" in raised.value.message
    assert raised.value.hint and "--resume latest" in raised.value.hint


# ---------------------------------------------------------------- WikiArt


@pytest.fixture()
def wikiart_root(tmp_path, photos):
    root = tmp_path / "wikiart"
    files = {
        "Impressionism/claude-monet_water-lilies-1.jpg": "coffee",
        "Impressionism/pierre-auguste-renoir_dance.jpg": "chelsea",
        "Baroque/rembrandt_self-portrait.jpg": "astronaut",
        "Ukiyo_e/katsushika-hokusai_the-great-wave.jpg": "rocket",
    }
    for relative, name in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        photos[name].save(root / relative, quality=90)
    (root / "Baroque" / "caravaggio_broken.jpg").write_bytes(b"\xff\xd8 truncated")
    return root


def write_csv(root):
    csv = root.parent / "wikiart_csv"
    csv.mkdir()
    (csv / "style_class.txt").write_text("0 Baroque\n1 Impressionism\n2 Ukiyo_e\n")
    (csv / "style_train.csv").write_text(
        "Impressionism/claude-monet_water-lilies-1.jpg,1\n"
        "Baroque/rembrandt_self-portrait.jpg,0\n"
        "Impressionism/gone_missing.jpg,1\n"
    )
    (csv / "style_val.csv").write_text("Ukiyo_e/katsushika-hokusai_the-great-wave.jpg,2\n")
    return csv


def test_wikiart_folder_gives_style_and_artist(wikiart_root):
    art = WikiArt(wikiart_root)
    assert len(art) == 4 and [p.name for p in art.skipped] == ["caravaggio_broken.jpg"]
    meta = {art.metadata(i)["path"]: art.metadata(i) for i in range(len(art))}
    assert meta["Impressionism/claude-monet_water-lilies-1.jpg"]["style"] == "Impressionism"
    assert meta["Impressionism/claude-monet_water-lilies-1.jpg"]["artist"] == "claude-monet"
    assert meta["Ukiyo_e/katsushika-hokusai_the-great-wave.jpg"]["style"] == "Ukiyo_e"
    assert {m["style"] for m in meta.values()} == {"Baroque", "Impressionism", "Ukiyo_e"}
    assert all(art[i].mode == "RGB" for i in range(len(art)))


def test_wikiart_csv_split_and_style_names(wikiart_root, photos):
    write_csv(wikiart_root)
    train = WikiArt(wikiart_root)
    assert len(train) == 2
    assert [train.metadata(i)["style"] for i in range(2)] == ["Impressionism", "Baroque"]
    assert [train.metadata(i)["style_id"] for i in range(2)] == [1, 0]
    assert [p.name for p in train.skipped] == ["gone_missing.jpg"]
    assert same_picture(train[0], photos["coffee"])
    val = WikiArt(wikiart_root.parent, split="val")  # the folder the release unpacks to works too
    assert len(val) == 1 and val.metadata(0)["style"] == "Ukiyo_e" and val.root == wikiart_root
    assert len(WikiArt(wikiart_root, split=None)) == 4


def test_art_domain_reads_wikiart_and_shards(wikiart_root, shard_folder):
    from e4tcli.plugins import load_registry

    dataset = load_registry().get("art").domain.dataset
    art = dataset(str(wikiart_root))
    assert isinstance(art, WikiArt) and art.metadata(0)["style"] in {"Baroque", "Impressionism", "Ukiyo_e"}
    assert isinstance(dataset(str(shard_folder)), TarShards)


# ---------------------------------------------------------------- dispatch


def test_any_images_picks_the_format_from_disk(lmdb_folder, shard_folder, wikiart_root, tmp_path):
    folder, _ = lmdb_folder
    assert isinstance(any_images(folder), LmdbImages)
    assert isinstance(any_images(str(folder / "data.mdb")), LmdbImages)
    assert isinstance(any_images(shard_folder), TarShards)
    assert isinstance(any_images(shard_folder / "shards-000.tar"), TarShards)
    assert isinstance(any_images(f"{shard_folder}/shards-{{000..002}}.tar"), TarShards)
    assert isinstance(any_images(wikiart_root), ImageFolder)
    assert looks_like_shards(f"{tmp_path}/nothing-{{0..3}}.tar") and not looks_like_shards(wikiart_root)
    with pytest.raises(UsageError, match="not found"):
        any_images(tmp_path / "missing")
    with pytest.raises(UsageError, match="tar shard not found"):
        any_images(tmp_path / "missing.tar")
    for name in ("cats", "faces"):
        from e4tcli.plugins import load_registry

        assert isinstance(load_registry().get(name).domain.dataset(str(folder)), LmdbImages)


def test_art_prompts_use_the_wikiart_style_name(wikiart_root):
    """Pre-training fills "{style}" from each painting's metadata; images without it get a plain template."""
    from e4tcli.datasets import ImageFolder
    from e4tcli.plugins import load_registry
    from e4tcli.training.pretrain import sample_prompt

    art = load_registry().get("art").domain
    styled = [t for t in art.prompt_templates if "{style}" in t]
    assert styled, "the art domain has a template using the style name"
    data = WikiArt(wikiart_root)
    prompts = {
        data.metadata(i)["path"]: sample_prompt(styled[0], data.metadata(i), "plain S*") for i in range(len(data))
    }
    assert prompts["Ukiyo_e/katsushika-hokusai_the-great-wave.jpg"] == styled[0].format(style="Ukiyo e")
    assert prompts["Baroque/rembrandt_self-portrait.jpg"] == styled[0].format(style="Baroque")
    plain_folder = ImageFolder(wikiart_root / "Baroque")
    assert plain_folder.metadata(0) == {}, "a folder without metadata.jsonl has no fields"
    assert sample_prompt(styled[0], plain_folder.metadata(0), "plain S*") == "plain S*"
    assert sample_prompt(styled[0], None, "plain S*") == "plain S*"


def test_a_substituted_painting_is_prompted_with_its_own_style(wikiart_root, tmp_path):
    """An unreadable painting is replaced by the next readable one, in workers and in the
    feature cache alike; the prompt's {style} must then be the replacement's, not the planned one's."""
    import torch

    from e4tcli.training.data import FeatureCache, MicroBatches
    from e4tcli.training.pretrain import PlannedSample, sample_prompt

    whole = (wikiart_root / "Baroque" / "rembrandt_self-portrait.jpg").read_bytes()
    (wikiart_root / "Baroque" / "rembrandt_zz-truncated.jpg").write_bytes(whole[: len(whole) // 3])
    data = WikiArt(wikiart_root)
    broken = next(i for i, path in enumerate(data.paths) if path.name == "rembrandt_zz-truncated.jpg")
    replacement = data.metadata(broken + 1)
    assert data.metadata(broken)["style"] == "Baroque" != replacement["style"]

    def plan(step):
        return [PlannedSample(broken, False, "{style} S*", 0), PlannedSample(broken - 1, True, "{style} S*", 1)]

    images, found, metadata = MicroBatches(data, plan, 1, 1, 1, 1, 0, 2, 16, with_metadata=True)[0]
    assert images.shape == (2, 16, 16, 3)
    assert [m["path"] for m in metadata] == [replacement["path"], data.metadata(broken - 1)["path"]]
    assert [p.name for p in found] == ["rembrandt_zz-truncated.jpg"]
    assert sample_prompt("a {style} painting of S*", metadata[0], "S*") == f"a {replacement['style']} painting of S*"

    cache = FeatureCache(tmp_path / "cache")
    cache.build(
        {"test": 1},
        data,
        len(data),
        lambda arrays: tuple(torch.zeros(len(arrays), 1) for _ in range(3)),
        16,
        with_metadata=True,
    )
    for flip in (False, True):
        assert cache.lookup(broken, flip)[3]["path"] == replacement["path"]
        assert cache.lookup(broken - 1, flip)[3]["path"] == data.metadata(broken - 1)["path"]


def test_feature_cache_encodes_a_chunk_in_small_batches(photo_folder, tmp_path, monkeypatch):
    """A chunk (256 images, both orientations) must not go through the VAE at once: at 512 px that
    alone would need over 100 GB of GPU memory. Each cached row is still its own image's encoding."""
    import torch

    import e4tcli.training.data as data_module
    from e4tcli.training.data import FeatureCache

    monkeypatch.setattr(data_module, "ENCODE_BATCH", 3)
    images = ImageFolder(photo_folder)
    sizes = []

    def encode(arrays):
        sizes.append(len(arrays))
        pixels = torch.from_numpy(np.stack(arrays)).float()
        colour = pixels.mean(dim=(1, 2))
        return colour, colour * 2, pixels[:, 0, :4, 0]  # the first row's start differs between the two flips

    cache = FeatureCache(tmp_path / "cache")
    cache.build({"test": 1}, images, len(images), encode, 16)
    assert max(sizes) <= 3 and sum(sizes) == 2 * len(images)
    for index in range(len(images)):
        for flip in (False, True):
            mean, std, features, _ = cache.lookup(index, flip)
            array = data_module.decode(images, index, 16)[0]
            alone = encode([np.ascontiguousarray(array[:, ::-1]) if flip else array])
            assert (
                torch.equal(mean, alone[0][0]) and torch.equal(std, alone[1][0]) and torch.equal(features, alone[2][0])
            )
