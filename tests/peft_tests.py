"""PEFT's own generic tuner tests for the installed peft, taken from that release's sdist on PyPI (never copied into
this repository): tests/test_custom_models.py (as custom_models.py, so pytest does not collect its thousands of cases
for other methods), testing_common.py and testing_utils.py, extracted once into .cache/peft-tests/<version>/ and reused
from there, so later runs are offline. `python tests/peft_tests.py` fetches them (scripts/test.sh does, while it
installs)."""

import importlib
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

CACHE_ROOT = Path(__file__).resolve().parent.parent / ".cache" / "peft-tests"
PACKAGE = "peft_upstream"  # the sdist's test files import each other relatively (`from .testing_utils import ...`)
# file in the sdist's tests/ -> name in the package
FILES = {"test_custom_models.py": "custom_models.py", "testing_common.py": "testing_common.py",
         "testing_utils.py": "testing_utils.py"}


def fetch(version: str | None = None) -> Path:
    """The folder to put on sys.path for `import peft_upstream`, downloading PEFT's sdist of `version` (default: the
    installed peft) unless it is cached already."""
    version = version or importlib.metadata.version("peft")
    folder = CACHE_ROOT / version
    if _complete(folder):
        return folder
    with tempfile.TemporaryDirectory(prefix="peft-sdist-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", f"peft=={version}",
               "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        sdists = sorted(Path(tmp).glob("peft-*.tar.gz"))
        if result.returncode != 0 or not sdists:
            errors = [re.sub(r" \(from versions: [^)]*\)", "", line)
                      for line in result.stderr.splitlines() if line.startswith("ERROR")] or [
                result.stderr.strip()[-300:]]
            raise RuntimeError(
                f"could not download PEFT's sdist peft=={version} from PyPI for PEFT's own tests "
                f"(`pip download --no-binary :all: --no-deps peft=={version}` failed: {' '.join(errors)}); "
                f"fix: run `python tests/peft_tests.py` once with network access (it caches them in {folder}), "
                f"with a peft release installed (a peft built from git has no sdist on PyPI)")
        CACHE_ROOT.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=CACHE_ROOT))  # renamed into place when complete
        try:
            package = staging / PACKAGE
            package.mkdir()
            with tarfile.open(sdists[0]) as tar:
                members = {Path(m.name).name: m for m in tar.getmembers()  # peft-<version>/tests/<file>
                           if m.isfile() and Path(m.name).parts[1:-1] == ("tests",) and Path(m.name).name in FILES}
                missing = sorted(set(FILES) - set(members))
                if missing:
                    raise RuntimeError(f"PEFT's sdist {sdists[0].name} has no tests/{', tests/'.join(missing)}; "
                                       f"these generic tests need a peft release that ships them")
                for source, target in FILES.items():
                    (package / target).write_bytes(tar.extractfile(members[source]).read())
            (package / "__init__.py").write_text(f'"""PEFT {version}\'s own tests, from its sdist."""\n')
            try:
                staging.rename(folder)
            except OSError:  # a run that got there first already put the same files in place
                if not _complete(folder):
                    raise RuntimeError(f"{folder} holds an incomplete copy of PEFT's tests; delete it and rerun")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def _complete(folder: Path) -> bool:
    return all((folder / PACKAGE / name).is_file() for name in FILES.values())


def load_custom_models():
    """PEFT's tests/test_custom_models.py module of the installed peft release."""
    folder = str(fetch())
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(f"{PACKAGE}.custom_models")


if __name__ == "__main__":
    try:
        print(f"PEFT's own tests for peft {importlib.metadata.version('peft')}: {fetch()}")
    except RuntimeError as error:
        sys.exit(f"error: {error}")
