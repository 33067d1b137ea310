"""Upload a finished stage-2 run to the Hugging Face Hub: the files people need to use it, in one commit."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from moalign.errors import MoalignError
from moalign.run.modelcard import hub_card

# What a user of the run needs: the weights (LoRA file or transformer/), the card, the config, the metrics and
# curves; not checkpoint-N/, tensorboard/, validation/ or wandb/ (pass them in `include` to add them)
HUB_FILES = (
    "README.md",
    "config.json",
    "metrics.json",
    "log.jsonl",
    "loss_curve.png",
    "align_projector.safetensors",
    "pytorch_lora_weights.safetensors",
    "transformer/*",
)
HUB_IGNORE = (".*", "*/.*")  # atomic writes' temporaries, a partial checkpoint


def hub_files(run_dir: Path, include: Sequence[str] = ()) -> list[str]:
    """The run's files (relative POSIX paths, sorted) that `push_to_hub` uploads: HUB_FILES and `include`
    patterns (fnmatch, as huggingface_hub's allow_patterns), less HUB_IGNORE."""
    from huggingface_hub.utils import filter_repo_objects

    found = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file())
    return list(
        filter_repo_objects(found, allow_patterns=[*HUB_FILES, *include], ignore_patterns=list(HUB_IGNORE))
    )


def push_to_hub(
    run_dir: str | Path,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    include: Sequence[str] = (),
) -> str:
    """Upload a finished stage-2 run to the Hub model repo `repo_id` (created if missing) in one commit.

    Args:
        run_dir: the run folder (`moalign stage2 --out`); it must be finished (README.md and the weights).
        repo_id: "user/name" or "org/name".
        private: create the repo private (an existing repo keeps its visibility).
        token: a Hub token; None: HF_TOKEN or the token saved by `hf auth login`.
        commit_message: default "moalign stage-2 run <folder name>".
        include: more patterns to upload, e.g. ("validation/*",) or ("checkpoint-*",).

    Returns:
        The repo's URL.

    The card is uploaded as `moalign/run/modelcard.py`'s `hub_card`: loading code that reads from the repo, and
    no local-path `base_model` (the Hub refuses one).
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    run_dir = Path(run_dir)
    if not (run_dir / "README.md").is_file() or not (
        (run_dir / "pytorch_lora_weights.safetensors").is_file() or (run_dir / "transformer").is_dir()
    ):
        raise MoalignError(
            f"{run_dir} is not a finished stage-2 run (no README.md and weights): finish it first "
            "(`moalign stage2 ... --resume latest`)"
        )
    files = hub_files(run_dir, include)
    card = hub_card((run_dir / "README.md").read_text(), repo_id).encode()
    operations = [
        CommitOperationAdd(path_in_repo=f, path_or_fileobj=card if f == "README.md" else run_dir / f)
        for f in files
    ]
    api = HfApi(token=token)
    # the Hub client's errors and those of the HTTP library under it (a refused connection is not an OSError
    # there); ValueError: a malformed repo id, a card the Hub refuses
    failures = (OSError, ValueError, *HfHubHTTPError.__bases__)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or f"moalign stage-2 run {run_dir.name}",
            repo_type="model",
        )
    except failures as err:
        reason = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise MoalignError(
            f"could not upload {run_dir} to the Hub repo {repo_id}: {reason}. Log in with `hf auth login` "
            "(`huggingface-cli login` in older huggingface_hub) or set HF_TOKEN to a token with write access "
            "to it, and check the repo id and the network (HF_ENDPOINT for a mirror)"
        ) from err
    return str(url)
