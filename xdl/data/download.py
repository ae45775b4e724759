"""Download a dataset file once, verify its checksum, never leave a partial file behind.

Only ``urllib`` is used. Every file is written to a temporary name next to its
destination and moved into place with ``os.replace`` only after its checksum matched,
so an interrupted or tampered download leaves nothing that a later run could mistake
for the real file.

Environment variables:

* ``XDL_CACHE_DIR``: where downloads go when no ``--data-dir`` is given
  (``$XDL_CACHE_DIR/<dataset>``; default ``~/.cache/xdl/<dataset>``).
* ``XDL_MNIST_URL``, ``XDL_FASHION_MNIST_URL``, ``XDL_CIFAR10_URL``: the base URL the
  file names are appended to (a mirror, or a local server in tests).
* ``XDL_CHECKSUMS``: a JSON object ``{"<dataset>/<file>": "sha256:<hex>"}`` that
  overrides entries of :data:`CHECKSUMS` (for mirrors serving other files).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

from xdl.errors import XdlError

__all__ = [
    "CHECKSUMS",
    "DEFAULT_URLS",
    "URL_ENV",
    "base_url",
    "cache_dir",
    "download",
    "expected_checksum",
    "fetch",
    "file_digest",
    "safe_extract",
]

# The published checksums of the real files ("<algorithm>:<hex digest>"), keyed by
# "<dataset>/<file name>". Tests (or mirrors) override entries here or via XDL_CHECKSUMS.
CHECKSUMS: dict[str, str] = {
    "mnist/train-images-idx3-ubyte.gz": "md5:f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "mnist/train-labels-idx1-ubyte.gz": "md5:d53e105ee54ea40749a09fcbcd1e9432",
    "mnist/t10k-images-idx3-ubyte.gz": "md5:9fb629c4189551a2d022fa330f9573f3",
    "mnist/t10k-labels-idx1-ubyte.gz": "md5:ec29112dd5afa0611ce80d1b7f02629c",
    "fashion-mnist/train-images-idx3-ubyte.gz": "md5:8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "fashion-mnist/train-labels-idx1-ubyte.gz": "md5:25c81989df183df01b3e8a0aad5dffbe",
    "fashion-mnist/t10k-images-idx3-ubyte.gz": "md5:bef4ecab320f06d8554ea6380940ec79",
    "fashion-mnist/t10k-labels-idx1-ubyte.gz": "md5:bb300cfdad3c16e7a12a480ee83cd310",
    "cifar10/cifar-10-python.tar.gz": "md5:c58f30108f718f92721af3b95e74349a",
    "cifar10/cifar-10-binary.tar.gz": "md5:c32a1d4ab5d03f1284b67883e8d87530",
}

DEFAULT_URLS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "cifar10": "https://www.cs.toronto.edu/~kriz/",
}
URL_ENV = {
    "mnist": "XDL_MNIST_URL",
    "fashion-mnist": "XDL_FASHION_MNIST_URL",
    "cifar10": "XDL_CIFAR10_URL",
}

_CHUNK = 1 << 20


def cache_dir(spec: dict, name: str) -> Path:
    """Where a dataset's downloads live: ``data_dir``, else ``$XDL_CACHE_DIR/<name>``, else ``~/.cache/xdl/<name>``."""
    if spec.get("data_dir"):
        return Path(spec["data_dir"])
    root = os.environ.get("XDL_CACHE_DIR")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "xdl"
    return base / name


def base_url(name: str) -> str:
    """The base URL for a dataset: its ``XDL_<NAME>_URL`` override, else the public mirror."""
    url = os.environ.get(URL_ENV.get(name, ""), "") or DEFAULT_URLS[name]
    return url if url.endswith("/") else url + "/"


def expected_checksum(name: str, filename: str) -> str | None:
    """The expected ``"algo:hex"`` checksum of ``<name>/<filename>`` (XDL_CHECKSUMS wins)."""
    key = f"{name}/{filename}"
    override = os.environ.get("XDL_CHECKSUMS")
    if override:
        try:
            table = json.loads(override)
        except ValueError as exc:
            raise XdlError(f"XDL_CHECKSUMS is not a JSON object: {exc}") from None
        if not isinstance(table, dict):
            raise XdlError("XDL_CHECKSUMS must be a JSON object mapping '<dataset>/<file>' to 'sha256:<hex>'")
        if key in table:
            return str(table[key])
    return CHECKSUMS.get(key)


def _parse_checksum(checksum: str) -> tuple[str, str]:
    algo, sep, digest = checksum.partition(":")
    if not sep:  # a bare hex digest: tell the algorithm from its length
        algo, digest = {32: "md5", 40: "sha1", 64: "sha256"}.get(len(checksum), ""), checksum
    algo = algo.lower()
    if algo not in ("md5", "sha1", "sha256", "sha512"):
        raise XdlError(f"unsupported checksum {checksum!r}: use 'sha256:<hex>' or 'md5:<hex>'")
    return algo, digest.lower()


def _new_hash(algo: str):
    try:
        return hashlib.new(algo, usedforsecurity=False)
    except TypeError:  # pragma: no cover - Pythons without usedforsecurity
        return hashlib.new(algo)


def file_digest(path: str | Path, algo: str = "sha256") -> str:
    """The hex digest of a file."""
    digest = _new_hash(algo)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, dest: str | Path, checksum: str | None, *, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest``, verifying ``checksum`` (``"sha256:<hex>"`` or ``"md5:<hex>"``).

    The data goes to a temporary file in ``dest``'s folder and is moved into place only
    when complete and verified; any failure removes the temporary file and raises
    ``XdlError``. ``checksum=None`` is refused: nothing unverified is ever kept.
    """
    dest = Path(dest)
    if not checksum:
        raise XdlError(f"no checksum is known for {dest.name}, so it will not be downloaded; place the file in --data-dir yourself")
    algo, want = _parse_checksum(checksum)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except OSError as exc:
        raise XdlError(f"cannot write to {dest.parent}: {exc.strerror or exc}") from None
    tmp = Path(tmp_name)
    digest = _new_hash(algo)
    try:
        with os.fdopen(fd, "wb") as out:
            request = urllib.request.Request(url, headers={"User-Agent": "xdl"})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                total = response.headers.get("Content-Length")
                total = int(total) if total and total.isdigit() else None
                received = 0
                from tqdm import tqdm

                with tqdm(
                    total=total,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=dest.name,
                    file=sys.stderr,
                    disable=not sys.stderr.isatty(),
                    leave=False,
                ) as bar:
                    for block in iter(lambda: response.read(_CHUNK), b""):
                        out.write(block)
                        digest.update(block)
                        received += len(block)
                        bar.update(len(block))
        if total is not None and received != total:
            raise XdlError(f"download of {url} stopped after {received} of {total} bytes; try again")
        got = digest.hexdigest()
        if got != want:
            raise XdlError(
                f"checksum mismatch for {dest.name} from {url}: expected {algo} {want}, got {got}; "
                "the file was not kept"
            )
        os.replace(tmp, dest)
    except XdlError:
        raise
    except urllib.error.HTTPError as exc:
        raise XdlError(f"could not download {url}: HTTP {exc.code} {exc.reason}; "
                       "download it yourself and pass --data-dir DIR") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise XdlError(f"could not download {url}: {reason}; download it yourself and pass --data-dir DIR") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def fetch(name: str, filename: str, folder: str | Path) -> Path:
    """Download ``<base_url(name)><filename>`` into ``folder`` with its known checksum."""
    return download(base_url(name) + filename, Path(folder) / filename, expected_checksum(name, filename))


def safe_extract(archive: str | Path, dest: str | Path) -> None:
    """Extract a tar archive into ``dest``, refusing absolute paths, '..', links and devices.

    Everything is unpacked into a temporary folder inside ``dest`` first and then moved
    into place file by file, so a broken archive leaves no half-extracted tree.
    """
    archive, dest = Path(archive), Path(dest)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                parts = PurePosixPath(member.name.replace("\\", "/")).parts
                absolute = member.name.startswith(("/", "\\")) or (bool(parts) and ":" in parts[0])
                if absolute or ".." in parts:
                    raise XdlError(f"refusing to extract {archive}: member {member.name!r} has an absolute path or '..'")
                if not (member.isfile() or member.isdir()):
                    raise XdlError(f"refusing to extract {archive}: member {member.name!r} is a link or special file")
            dest.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=dest, prefix=".extract-"))
            try:
                kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(tmp, members=members, **kwargs)
                for root, dirs, files in os.walk(tmp):
                    target = dest / Path(root).relative_to(tmp)
                    target.mkdir(parents=True, exist_ok=True)
                    for file in files:
                        os.replace(Path(root) / file, target / file)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except XdlError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise XdlError(f"cannot extract {archive}: {exc}") from None
