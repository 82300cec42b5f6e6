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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from e4tcli.errors import RuntimeFailure, UsageError

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
FINGERPRINT = re.compile(r"^[0-9a-f]{16}$")
LOSS_WINDOW = 100
"""The model card reports the mean losses of the run's last this-many logged steps."""


def is_hub_id(source: Optional[str]) -> bool:
    """``owner/name`` that is not an existing path (a local folder always wins)."""
    return isinstance(source, str) and bool(HUB_ID.match(source)) and not Path(source).exists()


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


def cached(published: Published) -> Optional[Path]:
    """The checkpoint's folder in the Hugging Face cache, or None when it has not been pulled."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(published.repo_id, revision=published.revision, local_files_only=True))
    except Exception:
        return None


def pull(published: Published, progress: bool = True):
    """The checkpoint (an ``io.checkpoint.DomainCheckpoint``), downloaded first when it is not in the
    cache, and verified."""
    folder = cached(published) or _download(published, progress)
    return verified(folder, published)


def _download(published: Published, progress: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    if not progress:
        disable_progress_bars()
    try:
        return Path(snapshot_download(published.repo_id, revision=published.revision))
    except (RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise UsageError(
            f"the Hub has no {published.label} ({type(error).__name__})",
            hint="the domain plugin names a checkpoint that is gone or private; "
            "log in with 'hf auth login' if it is private, or pass --checkpoint DIR",
        ) from None
    except Exception as error:
        raise RuntimeFailure(
            f"could not download domain checkpoint {published.label} ({type(error).__name__})",
            hint="check the network and run again (the download resumes), or pass --checkpoint DIR or none",
        ) from None
    finally:
        if not progress:
            enable_progress_bars()


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
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    with tempfile.TemporaryDirectory(prefix="e4t-push-") as tmp:
        staged = Path(tmp)
        save_file(checkpoint.tensors, str(staged / WEIGHTS_NAME), metadata={"format": config["format"]})
        (staged / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        validation = latest_validation_grid(Path(run_dir))
        if validation is not None:
            (staged / "validation.png").write_bytes(validation.read_bytes())
        losses = final_losses(Path(run_dir))
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
                f"could not publish to {repo_id} ({type(error).__name__}: {str(error).splitlines()[0][:160]})",
                hint="log in with 'hf auth login' (a token with write access), then run again",
            ) from None
    return PushResult(repo_id, commit.oid, checkpoint.fingerprint, getattr(commit, "commit_url", repo_id))


def latest_validation_grid(run_dir: Path) -> Optional[Path]:
    grids = sorted((run_dir / "validation").glob("step-*.png")) if (run_dir / "validation").is_dir() else []
    return grids[-1] if grids else None


def final_losses(run_dir: Path) -> dict[str, float]:
    """Mean of each loss over the run's last ``LOSS_WINDOW`` logged steps (empty without ``log.jsonl``)."""
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][-LOSS_WINDOW:]
    keys = sorted({k for r in records for k, v in r.items() if k != "step" and isinstance(v, (int, float))})
    return {k: sum(r[k] for r in records if k in r) / sum(1 for r in records if k in r) for k in keys}


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
