"""Published domain checkpoints: pulled from and pushed to the Hugging Face Hub.

A domain names its checkpoint as a hub id pinned to a commit, with the content
fingerprint e4t computes for its weights. ``pull`` downloads into the Hugging
Face cache (resumable, offline afterwards) and refuses weights whose
fingerprint differs; ``push`` publishes a pre-training run's checkpoint with a
model card.
"""

import json
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from e4tcli.errors import RuntimeFailure, UsageError

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
FINGERPRINT = re.compile(r"^[0-9a-f]{16}$")
LOSS_WINDOW = 100
"""The model card reports the mean losses of the run's last this-many logged steps."""
LOSSES = ("loss", "denoising", "embedding", "weights")
"""The loss terms ``e4t pretrain`` logs (total, denoising, ||offset||^2, ||dW||^2)."""


def is_hub_id(source) -> bool:
    """``owner/name`` that is not an existing path (a local folder always wins)."""
    return isinstance(source, str) and bool(HUB_ID.match(source)) and not Path(source).exists()


def names_hub_checkpoint(domain) -> bool:
    """Whether a domain's checkpoint is on the Hub: it is pinned (whatever folders the current directory has),
    or it reads as ``owner/name`` and no such folder exists."""
    if domain.checkpoint is None:
        return False
    pinned = domain.checkpoint_revision is not None or domain.checkpoint_fingerprint is not None
    return pinned or is_hub_id(domain.checkpoint)


def is_commit(value: Optional[str]) -> bool:
    return isinstance(value, str) and bool(COMMIT.match(value))


def is_fingerprint(value: Optional[str]) -> bool:
    return isinstance(value, str) and bool(FINGERPRINT.match(value))


@dataclass(frozen=True)
class Published:
    """A domain checkpoint on the Hub: where, which commit, and what its weights must hash to."""

    repo_id: str
    revision: str
    fingerprint: str

    @property
    def label(self) -> str:
        return f"{self.repo_id}@{self.revision[:12]}"


def published(domain) -> Optional[Published]:
    """The domain's checkpoint on the Hub, or None when its checkpoint is elsewhere (or it has none)."""
    if not names_hub_checkpoint(domain):
        return None
    if not is_commit(domain.checkpoint_revision) or not is_fingerprint(domain.checkpoint_fingerprint):
        raise UsageError(
            f"domain '{domain.name}' names hub checkpoint '{domain.checkpoint}' without a pinned revision and fingerprint",
            hint="ask the plugin's authors to set checkpoint_revision and checkpoint_fingerprint, or pass --checkpoint",
        )
    return Published(str(domain.checkpoint), domain.checkpoint_revision, domain.checkpoint_fingerprint)


def cached(published: Published) -> Optional[Path]:
    """The checkpoint's folder in the Hugging Face cache, or None when it has not been (wholly) pulled."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(published.repo_id, revision=published.revision, local_files_only=True))
    except Exception:
        return None
    return folder if complete(folder) else None


def complete(folder: Path) -> bool:
    from e4tcli.io.checkpoint import CONFIG_NAME, WEIGHTS_NAME

    return (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()


def pull(published: Published, progress: bool = True):
    """The checkpoint (an ``io.checkpoint.DomainCheckpoint``), downloaded first when it is not in the
    cache, and verified."""
    folder = cached(published) or download(published.repo_id, published.revision, progress)
    return verified(folder, published)


def download(repo_id: str, revision: Optional[str], progress: bool) -> Path:
    """``repo_id`` at ``revision`` (None: its main branch) into the Hugging Face cache; its folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    label = f"{repo_id}@{revision[:12]}" if revision else repo_id
    silenced = not progress and not are_progress_bars_disabled()
    if silenced:
        disable_progress_bars()
    failed = RuntimeFailure(
        f"could not download domain checkpoint {label}",
        hint="check the network and run again (the download resumes), or pass --checkpoint DIR or none",
    )
    try:
        folder = Path(snapshot_download(repo_id, revision=revision))
    except (RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise UsageError(
            f"the Hub has no {label} ({type(error).__name__})",
            hint="check the name (log in with 'hf auth login' if it is private), or pass --checkpoint DIR or none",
        ) from None
    except Exception as error:
        failed.message += f" ({type(error).__name__})"
        raise failed from None
    finally:
        if silenced:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                enable_progress_bars()
    if not complete(folder):  # offline, huggingface_hub returns what an interrupted download left
        raise failed
    return folder


def verified(folder: Path, published: Published):
    """The checkpoint in ``folder``, when its weights hash to what the plugin declares."""
    from e4tcli.io.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(folder)
    fingerprint = checkpoint.fingerprint
    if fingerprint != published.fingerprint:
        raise UsageError(
            f"domain checkpoint {published.label} has fingerprint {fingerprint}, "
            f"but the domain plugin declares {published.fingerprint}",
            hint="the download does not hold the weights the plugin was published with; "
            "upgrade the plugin, or ask its authors",
        )
    return checkpoint


@dataclass
class PushResult:
    repo_id: str
    revision: str
    fingerprint: str
    url: str


def push(run_dir: Path, repo_id: str, private: bool = False, api: Any = None) -> PushResult:
    """Publish the checkpoint in ``run_dir`` (its EMA weights when present) as ``repo_id``."""
    from safetensors.torch import save_file

    from e4tcli.io.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_checkpoint

    if not HUB_ID.match(repo_id):
        raise UsageError(f"'{repo_id}' is not a hub id", hint="pass OWNER/NAME, e.g. you/e4t-cats")
    checkpoint = load_checkpoint(Path(run_dir))
    config = {**checkpoint.config, "fingerprint": checkpoint.fingerprint}
    run = checkpoint.folder.parent if (checkpoint.folder.parent / "latest").is_file() else checkpoint.folder
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    with tempfile.TemporaryDirectory(prefix="e4t-push-") as tmp:
        staged = Path(tmp)
        save_file(checkpoint.tensors, str(staged / WEIGHTS_NAME), metadata={"format": config["format"]})
        (staged / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        validation = latest_validation_grid(run, config.get("step"))
        if validation is not None:
            (staged / "validation.png").write_bytes(validation.read_bytes())
        losses = final_losses(run, config.get("step"))
        (staged / "README.md").write_text(model_card(config, repo_id, losses, validation is not None))
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            commit = api.upload_folder(
                folder_path=str(staged),
                repo_id=repo_id,
                repo_type="model",
                commit_message=f"e4t domain '{config['domain']}', step {config.get('step', '?')}",
            )
        except Exception as error:
            raise RuntimeFailure(
                f"could not publish to {repo_id} ({type(error).__name__}: {(str(error).splitlines() or [''])[0][:160]})",
                hint="log in with 'hf auth login' (a token with write access), then run again",
            ) from None
    return PushResult(repo_id, commit.oid, checkpoint.fingerprint, getattr(commit, "commit_url", repo_id))


def latest_validation_grid(run_dir: Path, step: Optional[int]) -> Optional[Path]:
    """The run's last validation grid up to ``step`` (None: any)."""
    folder = run_dir / "validation"
    grids = sorted(folder.glob("step-*.png")) if folder.is_dir() else []
    if step is not None:
        grids = [g for g in grids if g.stem.removeprefix("step-").isdigit() and int(g.stem[5:]) <= step]
    return grids[-1] if grids else None


def final_losses(run_dir: Path, step: Optional[int]) -> dict[str, float]:
    """Mean of each loss term over the last ``LOSS_WINDOW`` steps logged up to ``step`` (empty without
    ``log.jsonl``; lines that do not parse, such as a last line cut by a crash, are skipped)."""
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return {}
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and (step is None or record.get("step", 0) <= step):
            records.append(record)
    records = records[-LOSS_WINDOW:]
    means = {}
    for name in LOSSES:
        values = [r[name] for r in records if isinstance(r.get(name), (int, float))]
        if values:
            means[name] = sum(values) / len(values)
    return means


def model_card(config: dict, repo_id: str, losses: dict[str, float], has_validation: bool) -> str:
    """A Hugging Face model card: what the checkpoint is, what made it, and how to use it."""
    training = config.get("training", {})
    recipe = config.get("recipe", {})
    base, backbone = config["base_model"], config["backbone"]
    domain = config["domain"]
    front = ["---", "library_name: e4t", "tags:", "- e4t", "- text-to-image", "- personalization"]
    if is_hub_id(base.get("source")):
        front.append(f"base_model: {base['source']}")
    front.append("---")
    rows = [
        ("domain", domain),
        ("class word", config.get("class_word", "-")),
        ("base model", f"{base['source']} (fingerprint {base['fingerprint']})"),
        ("image backbone", f"{backbone['source']} (fingerprint {backbone['fingerprint']})"),
        ("data", str(recipe.get("data", "-"))),
        ("steps", str(config.get("step", training.get("steps", "-")))),
        ("batch size", f"{training.get('batch_size', '-')} per process, {training.get('processes', 1)} process(es)"),
        ("learning rate", str(training.get("learning_rate", "-"))),
        ("resolution", str(training.get("resolution", "-"))),
        ("offsets", json.dumps(config.get("offsets", {}), sort_keys=True)),
        ("checkpoint fingerprint", config["fingerprint"]),
        ("e4t version", str(config.get("e4t_version", "-"))),
    ]
    rows += [
        (f"{name} (mean of the last {LOSS_WINDOW} logged steps)", f"{value:.4g}") for name, value in losses.items()
    ]
    lines = [
        *front,
        "",
        f"# e4t domain checkpoint: {domain}",
        "",
        f"A pre-trained [E4T](https://tuning-encoder.github.io/) domain for `e4t tune IMAGE --domain {domain}`:",
        "an encoder that maps an image to a word embedding, and the weight offsets that make the base model",
        "quick to learn a new concept of this domain.",
        "",
        "| | |",
        "| --- | --- |",
        *(f"| {name} | {value} |" for name, value in rows),
        "",
    ]
    if has_validation:
        lines += ["Validation images at the last checkpoint:", "", "![validation](validation.png)", ""]
    lines += [
        "## Use",
        "",
        "In a domain plugin (`e4tcli.Domain`):",
        "",
        "```python",
        f'checkpoint="{repo_id}",',
        "checkpoint_revision=\"COMMIT\",  # the commit 'e4t domains push' printed",
        f'checkpoint_fingerprint="{config["fingerprint"]}",',
        "```",
        "",
        f"or directly: `e4t tune IMAGE --domain {domain} --checkpoint DIR` with this repository downloaded to DIR",
        f"(`hf download {repo_id} --local-dir DIR`).",
        "",
    ]
    return "\n".join(lines)
