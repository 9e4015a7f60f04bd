"""State on disk: atomic files and directories, checksums, and the run manifest.

Layout of a run directory::

    run_dir/
      config.yml                         the fully merged config of the latest invocation
      manifest.json                      stage order, status, config hashes, head (rewritten atomically, last)
      stages/<stage>/<model>/v<N>/       one checkpoint directory per (stage, model) run, never overwritten

A stage writes into ``v<N>.tmp-<pid>`` and renames it to ``v<N>`` when it is complete; only then is the
manifest rewritten to point at it. A crash at any instant leaves the previous manifest pointing at complete
directories. Nothing is deleted: re-running a stage creates a new version directory.
"""
import hashlib
import json
import os
import shutil
import tempfile
import time

from compress.errors import CheckpointError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1

DONE, STALE, FAILED = "done", "stale", "failed"


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


WEIGHTS_FILE = "model.pdparams"  # the weights a stage checkpoint saves (paddle.save of the state_dict)

def atomic_write_bytes(dest, data):
    """Write ``data`` to ``dest`` through a temporary file in the same folder and ``os.replace``."""
    folder = os.path.dirname(os.path.abspath(dest))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(dest) + ".", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; reports and manifests are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def atomic_write_text(dest, text):
    atomic_write_bytes(dest, text.encode("utf-8"))


def atomic_write_json(dest, obj):
    atomic_write_text(dest, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


def sha256_file(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def checksum_tree(folder):
    """sha256 of every file below ``folder``, keyed by relative path (POSIX separators)."""
    sums = {}
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            full = os.path.join(root, name)
            sums[os.path.relpath(full, folder).replace(os.sep, "/")] = sha256_file(full)
    return dict(sorted(sums.items()))


def verify_files(folder, expected, what):
    """Check that every file recorded in ``expected`` exists under ``folder`` with the recorded sha256.

    Raises:
        CheckpointError: naming ``what`` (stage/model) and the missing or corrupt file.
    """
    for rel, digest in expected.items():
        full = os.path.join(folder, rel)
        if not os.path.isfile(full):
            raise CheckpointError(f"{what}: checkpoint file missing: {full}; restore it, or re-run the stage "
                                  f"with --rollback-to the stage before it")
        if sha256_file(full) != digest:
            raise CheckpointError(f"{what}: checkpoint file corrupt (sha256 mismatch): {full}; re-run the stage "
                                  f"with --rollback-to the stage before it")


class StagingDir:
    """A checkpoint directory under construction; ``commit()`` renames it into place atomically.

    Example::

        with StagingDir(final_dir) as tmp:
            write files into tmp.path
            tmp.commit()
    """

    def __init__(self, final_dir):
        self.final_dir = os.path.abspath(final_dir)
        parent = os.path.dirname(self.final_dir)
        os.makedirs(parent, exist_ok=True)
        self.path = tempfile.mkdtemp(prefix=os.path.basename(self.final_dir) + ".tmp-", dir=parent)
        self.committed = False

    def commit(self):
        if os.path.exists(self.final_dir):
            raise CheckpointError(f"{self.final_dir}: already exists; refusing to overwrite a checkpoint")
        for root, _, files in os.walk(self.path):
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
        os.replace(self.path, self.final_dir)
        _fsync_dir(os.path.dirname(self.final_dir))
        self.committed = True
        return self.final_dir

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        # An unfinished staging dir is garbage by construction (never referenced by the manifest).
        if not self.committed and os.path.isdir(self.path):
            shutil.rmtree(self.path, ignore_errors=True)
        return False


def next_version_dir(folder):
    """``folder/v<N>`` with N one past the highest existing version (complete or not)."""
    highest = 0
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            stem = name.split(".tmp-")[0]
            if stem.startswith("v") and stem[1:].isdigit():
                highest = max(highest, int(stem[1:]))
    return os.path.join(folder, f"v{highest + 1}")


class Manifest:
    """The run manifest: which (stage, model) checkpoints exist, their status, hash and metrics.

    ``entries[stage][model]`` holds ``status`` (done / stale / failed), ``dir`` (relative to the run dir),
    ``config_hash``, ``files`` (relative path -> sha256), ``metrics``, ``metadata``, ``seconds``, ``finished_at``.
    """

    def __init__(self, run_dir, data=None):
        self.run_dir = os.path.abspath(run_dir)
        self.data = data or {"format": MANIFEST_FORMAT, "pipeline": [], "models": [], "head": None, "entries": {}}

    @property
    def path(self):
        return os.path.join(self.run_dir, MANIFEST_NAME)

    @classmethod
    def load(cls, run_dir):
        """Load ``run_dir/manifest.json``; a fresh manifest when there is none."""
        path = os.path.join(run_dir, MANIFEST_NAME)
        if not os.path.exists(path):
            return cls(run_dir)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: unreadable run manifest ({exc}); restore it from a backup or "
                                  f"choose a new Global.run_dir")
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or "entries" not in data:
            raise CheckpointError(f"{path}: not a run manifest of format {MANIFEST_FORMAT}; choose a new "
                                  f"Global.run_dir")
        return cls(run_dir, data)

    def save(self):
        self.data["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        atomic_write_json(self.path, self.data)

    @property
    def entries(self):
        return self.data["entries"]

    @property
    def head(self):
        return self.data.get("head")

    def entry(self, stage, model):
        return self.entries.get(stage, {}).get(model)

    def set_entry(self, stage, model, entry):
        self.entries.setdefault(stage, {})[model] = entry

    def abs_dir(self, entry):
        return os.path.join(self.run_dir, entry["dir"])

    def weight_stages(self, model, until_stage=None, weights_file=WEIGHTS_FILE):
        """The finished stages of ``model``, in pipeline order before ``until_stage`` (None: all), whose checkpoint
        saved weights (``weights_file``)."""
        stages = []
        for stage in self.data.get("pipeline", []):
            if stage == until_stage:
                break
            entry = self.entry(stage, model) or {}
            if entry.get("status") == DONE and weights_file in entry.get("files", {}):
                stages.append(stage)
        return stages

    def verified_dir(self, stage, model):
        """The checkpoint dir of a finished (stage, model) after checking every recorded file's sha256."""
        entry = self.entry(stage, model)
        if entry is None or entry.get("status") != DONE:
            raise CheckpointError(f"stage '{stage}' has no finished checkpoint for model '{model}' in "
                                  f"{self.run_dir}; run the pipeline up to that stage first")
        return self._verified(entry, stage, model)

    def checkpoint_dir(self, stage, model):
        """The (sha256-checked) checkpoint dir of a finished or gate-failed (stage, model), or None when there is
        none."""
        entry = self.entry(stage, model)
        if entry is None or entry.get("status") not in (DONE, FAILED):
            return None
        return self._verified(entry, stage, model)

    def _verified(self, entry, stage, model):
        folder = self.abs_dir(entry)
        verify_files(folder, entry.get("files", {}), f"stage '{stage}', model '{model}'")
        return folder
