"""Portable checkpoint bundles: a run's checkpoint as a few bounded files, and back into a run folder.

For runs split into segments, each a time-limited job (a spot or preemptible instance, a cluster queue's
wall-time limit) on a machine that keeps no local disk after the job, where the output kept from a job
is a few files of bounded size (e.g. the object-size or file-count limits of the storage it is copied to):

    python -m drt_jax.train.bundle export --run-dir R [--step N] --out B [--max-files 8 --max-file-mib 16]
    python -m drt_jax.train.bundle import --bundle B --run-dir R [--set KEY=VALUE ...]
    python train.py --config ... --set train.run_dir=R      # resumes at the bundle's step
    python -m drt_jax.train.bundle regroup --bundle B --config C [--set ...] --out B2   # new retrieval groups

`regroup` re-cuts a DRT's upper layers into other retrieval groups (e.g. decoder (4, 4) -> (4, 2, 2)):
the same layers in the same order, each new group's landmark norm copied from the old group that held
its first layer; the bundle starts a run of the new layout through `train.init_from` (segment.py
--init-bundle), with a fresh optimizer and data stream.

A bundle folder holds
  config.json      the run's RunConfig, as train.py wrote it
  manifest.json    format, step, rng, data iterator state, commit, what is included in which dtype,
                   and for every array its name, shape, stored and original dtype and the byte ranges
                   (file, offset, length) it occupies; for every file its size and CRC-32
  arrays-<i>.bin   the arrays' raw little-endian bytes, one after another, split at file boundaries

Precision: export picks the first of these layouts whose bytes fit in (max_files - 2) files of
max_file_mib each: params fp32 + optimizer fp32 (the import resumes bit for bit), params fp32 +
optimizer moments bf16, params bf16 + moments bf16, params fp32 without optimizer, params bf16 without
optimizer. The import upcasts to the fp32 master weights and fp32 moments; without an optimizer state
it initialises a fresh one (Adam moments zero, its step count 0; the learning-rate schedule still
follows the run's step) and says so at import and when train.py resumes there (imported.json).
The imported checkpoint is written with orbax like any other, so train.py and eval.py read it as usual.
Bundles hold single-process runs (one data iterator state).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import zlib

import jax
import ml_dtypes
import numpy as np

from drt_jax.config import ConfigError
from drt_jax.train.checkpoints import (
    Checkpointer,
    CheckpointError,
    UnreadableCheckpoint,
    read_only_checkpointer,
    read_run_config,
)
from drt_jax.train.config import RunConfig, apply_overrides, model_mismatch

FORMAT = "drt-jax-bundle/1"
MANIFEST = "manifest.json"
CONFIG = "config.json"
IMPORTED = "imported.json"  # in the run folder: what the newest import brought (read by the loop at resume)
MIB = 1024 * 1024


def _abs(path) -> pathlib.Path:
    return pathlib.Path(path).expanduser().absolute()

# (params dtype, optimizer dtype or None), most precise first.
LAYOUTS = (("float32", "float32"), ("float32", "bfloat16"), ("bfloat16", "bfloat16"), ("float32", None), ("bfloat16", None))


class BundleError(ConfigError):
    """A bundle that cannot be written or read; the message is one line naming the problem and the fix."""


class _IteratorState:
    """Stands in for the grain iterator so orbax's grain handler reads and writes its state verbatim."""

    def __init__(self, state: bytes = b""):
        self.state = state

    def get_state(self) -> bytes:
        return self.state

    def set_state(self, state: bytes) -> None:
        self.state = state

    def start_prefetch(self) -> None:
        pass


# --- pure pieces ----------------------------------------------------------------------------------


def flatten(tree) -> dict[str, np.ndarray]:
    """pytree of arrays -> {keystr path: numpy array}, in the tree's leaf order."""
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(abstract, arrays: dict[str, np.ndarray], what: str):
    """{keystr path: array} -> the pytree of `abstract` (ShapeDtypeStruct leaves), cast to its dtypes.
    Raises BundleError naming the first missing, extra or misshapen array."""
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]]
    extra = sorted(set(arrays) - set(paths))
    if extra:
        raise BundleError(f"the bundle's {what} has {extra[0]}, which the config's {what} lacks; import with the run's own config")
    leaves = []
    for path, want in zip(paths, jax.tree.leaves(abstract), strict=True):
        if path not in arrays:
            raise BundleError(f"the bundle's {what} lacks {path}; import with the run's own config (check --set overrides)")
        have = arrays[path]
        if tuple(have.shape) != tuple(want.shape):
            raise BundleError(f"{what} {path} is {tuple(have.shape)} in the bundle, {tuple(want.shape)} in the config; "
                              "import with the run's own config")
        leaves.append(np.asarray(have).astype(want.dtype))
    return jax.tree.unflatten(jax.tree.structure(abstract), leaves)


def storage_dtype(array: np.ndarray, target: str) -> np.dtype:
    """The dtype an array is stored in: floating arrays in `target`, anything else (counts) as is."""
    if np.issubdtype(array.dtype, np.floating) and array.ndim > 0:
        return np.dtype(ml_dtypes.bfloat16) if target == "bfloat16" else np.dtype(target)
    return array.dtype


def plan_layout(params: dict, opt_state: dict, capacity: int) -> tuple[str, str | None]:
    """The most precise layout of LAYOUTS whose bytes fit in `capacity`; BundleError if none does."""
    for p_dtype, o_dtype in LAYOUTS:
        total = sum(a.size * storage_dtype(a, p_dtype).itemsize for a in params.values())
        if o_dtype is not None:
            total += sum(a.size * storage_dtype(a, o_dtype).itemsize for a in opt_state.values())
        if total <= capacity:
            return p_dtype, o_dtype
    smallest = sum(a.size * 2 for a in params.values())
    raise BundleError(f"the bf16 parameters alone take {smallest / MIB:.1f} MiB, more than the {capacity / MIB:.1f} MiB "
                      "the file limits allow; raise --max-files or --max-file-mib")


def pack(arrays: list[tuple[str, str, np.ndarray]], max_file_bytes: int) -> tuple[list[bytes], list[dict]]:
    """[(group, name, array)] -> (file contents, tensor entries): the arrays' bytes back to back, cut into
    files of at most max_file_bytes; an entry's pieces are [file index, offset, length] ranges."""
    files, current, entries = [], bytearray(), []
    for group, name, array in arrays:
        data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
        pieces, pos = [], 0
        while pos < len(data) or not pieces:
            if len(current) == max_file_bytes:
                files.append(bytes(current))
                current = bytearray()
            take = min(len(data) - pos, max_file_bytes - len(current))
            pieces.append([len(files), len(current), take])
            current += data[pos:pos + take]
            pos += take
        entries.append({"group": group, "name": name, "shape": list(array.shape), "dtype": array.dtype.name,
                        "pieces": pieces})
    if current or not files:
        files.append(bytes(current))
    return files, entries


def unpack(entry: dict, files: list[bytes]) -> np.ndarray:
    """One tensor entry of the manifest -> its array, in its stored dtype."""
    data = b"".join(files[i][offset:offset + length] for i, offset, length in entry["pieces"])
    dtype = np.dtype(ml_dtypes.bfloat16) if entry["dtype"] == "bfloat16" else np.dtype(entry["dtype"])
    return np.frombuffer(data, dtype.newbyteorder("<")).astype(dtype).reshape(entry["shape"])


def _file_name(i: int) -> str:
    return f"arrays-{i}.bin"


# --- export ---------------------------------------------------------------------------------------


def _abstract_state(run: RunConfig):
    """ShapeDtypeStructs of params and optimizer state on the first local device."""
    import flax.linen as nn

    from drt_jax.train.optim import make_optimizer
    from drt_jax.train.step import boxed_param_shapes

    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    params = nn.unbox(boxed_param_shapes(run.model))
    tx, _ = make_optimizer(run.optim, run.train.steps)
    opt = jax.eval_shape(tx.init, params)
    abstract = {"params": params, "opt_state": opt, "step": jax.ShapeDtypeStruct((), np.int32),
                "rng": jax.ShapeDtypeStruct((2,), np.uint32)}
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract), tx


def _read_checkpoint(run_dir, run: RunConfig, step: int | None):
    """The newest readable checkpoint (or `step`) of a run folder -> (step, state, data iterator bytes)."""
    ckpt_dir = _abs(run_dir) / "checkpoints"
    ckpt = read_only_checkpointer(run_dir) if ckpt_dir.is_dir() else None
    if ckpt is None or not ckpt.all_steps():
        raise BundleError(f"{run_dir} holds no checkpoint; train first or pass the run folder train.py wrote")
    steps = sorted(ckpt.all_steps(), reverse=True)
    try:
        if step is not None and step not in steps:
            raise BundleError(f"step {step} is not among the checkpoints of {run_dir} ({sorted(steps)}); pass one of them")
        if any(p.name != "process_0-of-1.json" for p in ckpt_dir.glob("*/data/process_*.json")):
            raise BundleError(f"{run_dir} was trained by several processes; bundles hold single-process runs only")
        abstract, _ = _abstract_state(run)
        failures = []
        for candidate in [step] if step is not None else steps:
            data = _IteratorState()
            try:
                state = ckpt.restore_readable(candidate, abstract, model=run.model, data_iter=data)
            except UnreadableCheckpoint as err:
                failures.append((candidate, str(err)))
                continue
            return candidate, state, data.state
    finally:
        ckpt.manager.close()
    raise BundleError(f"no readable checkpoint to export in {ckpt_dir} ({'; '.join(f'step {s}: {r}' for s, r in failures)}); "
                      "pick another --step or run folder")


def export_bundle(run_dir, out, *, step: int | None = None, max_files: int = 8, max_file_mib: float = 16) -> str:
    """Writes the bundle of `run_dir`'s checkpoint (newest readable one, or `step`) to folder `out`.
    Returns the one-line summary of what was included."""
    if max_files < 3:
        raise BundleError(f"--max-files {max_files} leaves no file for arrays besides config.json and manifest.json; use 3 or more")
    max_file_bytes = int(max_file_mib * MIB)
    if max_file_bytes < 64 * 1024:
        raise BundleError(f"--max-file-mib {max_file_mib} is below 1/16 MiB, too small for the manifest; raise it")
    run = read_run_config(run_dir)
    step, state, data_state = _read_checkpoint(run_dir, run, step)
    params, opt_state = flatten(state["params"]), flatten(state["opt_state"])
    p_dtype, o_dtype = plan_layout(params, opt_state, (max_files - 2) * max_file_bytes)
    arrays = [("params", k, v.astype(storage_dtype(v, p_dtype))) for k, v in params.items()]
    if o_dtype is not None:
        arrays += [("opt_state", k, v.astype(storage_dtype(v, o_dtype))) for k, v in opt_state.items()]
    files, entries = pack(arrays, max_file_bytes)
    commit_file = _abs(run_dir) / "git_commit.txt"
    manifest = {
        "format": FORMAT, "step": step, "rng": [int(x) for x in np.asarray(state["rng"])],
        "data_iterator": data_state.decode(), "commit": commit_file.read_text().strip() if commit_file.is_file() else "unknown",
        "source_run": str(_abs(run_dir)), "params_dtype": p_dtype, "optimizer_dtype": o_dtype, "tensors": entries,
        "files": {_file_name(i): {"bytes": len(f), "crc32": zlib.crc32(f)} for i, f in enumerate(files)},
    }
    text = json.dumps(manifest, indent=1)
    config_text = run.to_json()
    for name, size in ((MANIFEST, len(text)), (CONFIG, len(config_text))):
        if size > max_file_bytes:
            raise BundleError(f"{name} takes {size} bytes, more than --max-file-mib {max_file_mib}; raise it")
    out = _abs(out)
    out.mkdir(parents=True, exist_ok=True)
    stale = sorted(p.name for p in out.iterdir())
    if stale:
        raise BundleError(f"{out} is not empty ({', '.join(stale[:3])}); pass a new or empty --out folder")
    for i, f in enumerate(files):
        (out / _file_name(i)).write_bytes(f)
    (out / CONFIG).write_text(config_text)
    (out / MANIFEST).write_text(text)
    p_bytes = sum(a.nbytes for g, _, a in arrays if g == "params")
    o_text = (f"optimizer state {o_dtype} ({sum(a.nbytes for g, _, a in arrays if g == 'opt_state') / MIB:.2f} MiB)"
              if o_dtype else "no optimizer state (it does not fit; the import restarts the optimizer)")
    return (f"bundle {out}: step {step}, parameters {p_dtype} ({p_bytes / MIB:.2f} MiB), {o_text}, rng and data iterator; "
            f"{len(files) + 2} files, the largest {max(len(f) for f in files) / MIB:.2f} MiB (limits {max_files} x {max_file_mib} MiB)")


# --- import ---------------------------------------------------------------------------------------


def read_bundle(bundle) -> tuple[dict, RunConfig, list[bytes]]:
    """A bundle folder -> (manifest, RunConfig, array files), every file checked against the manifest."""
    bundle = _abs(bundle)
    if not (bundle / MANIFEST).is_file():
        raise BundleError(f"{bundle / MANIFEST} is missing: {bundle} is not a bundle; pass the folder `bundle export` wrote")
    try:
        manifest = json.loads((bundle / MANIFEST).read_text())
    except ValueError as err:
        raise BundleError(f"{bundle / MANIFEST} cannot be read ({err}); export the bundle again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{bundle / MANIFEST} is not a {FORMAT} manifest; export the bundle again with this version")
    if not (bundle / CONFIG).is_file():
        raise BundleError(f"{bundle / CONFIG} is missing; copy the whole bundle folder")
    try:
        run = RunConfig.from_dict(json.loads((bundle / CONFIG).read_text()))
    except (ValueError, TypeError) as err:
        raise BundleError(f"{bundle / CONFIG} cannot be read ({' '.join(str(err).split())}); export the bundle again") from None
    files = []
    for i in range(len(manifest["files"])):
        name, want = _file_name(i), manifest["files"][_file_name(i)]
        path = bundle / name
        if not path.is_file():
            raise BundleError(f"{path} is missing; copy all {len(manifest['files']) + 2} files of the bundle")
        data = path.read_bytes()
        if len(data) != want["bytes"]:
            raise BundleError(f"{path} has {len(data)} bytes, the manifest says {want['bytes']}: it is truncated or "
                              "from another bundle; copy it again")
        if zlib.crc32(data) != want["crc32"]:
            raise BundleError(f"{path} does not match its CRC-32 in the manifest: it is corrupt; copy it again")
        files.append(data)
    return manifest, run, files


def import_bundle(bundle, run_dir, overrides=(), *, say=print) -> int:
    """Writes the bundle as an orbax checkpoint of `run_dir` (created if needed) that train.py resumes
    from. overrides: `section.field=value` strings for the run's config (the model must stay the same).
    Returns the step."""
    manifest, run, files = read_bundle(bundle)
    run_dir = _abs(run_dir)
    try:
        target = apply_overrides(run, [*overrides, f"train.run_dir={run_dir}"])
    except ConfigError as err:
        raise BundleError(f"{err}") from None
    problem = model_mismatch(dataclasses.asdict(run.model), target.model)
    if problem:
        raise BundleError(f"--set changes the bundle's model ({problem}); drop that override: a bundle's parameters "
                          "fit only their own model")
    if (run_dir / "config.json").is_file():
        existing = read_run_config(run_dir)
        problem = model_mismatch(dataclasses.asdict(existing.model), target.model)
        if problem:
            raise BundleError(f"{run_dir} holds another model ({problem}); import into a new --run-dir")
    step = int(manifest["step"])
    ckpt_dir = run_dir / "checkpoints"
    if ckpt_dir.is_dir():
        taken = [s for s in read_only_checkpointer(run_dir).all_steps() if s >= step]
        if taken:
            raise BundleError(f"{run_dir} already holds checkpoint {max(taken)} >= the bundle's step {step}; "
                              "import into a new --run-dir (or move those checkpoints away)")
    arrays = {"params": {}, "opt_state": {}}
    for entry in manifest["tensors"]:
        arrays[entry["group"]][entry["name"]] = unpack(entry, files)
    abstract, tx = _abstract_state(target)
    params = unflatten(abstract["params"], arrays["params"], "parameters")
    if manifest["optimizer_dtype"] is None:
        opt_state = jax.tree.map(np.asarray, tx.init(params))
    else:
        opt_state = unflatten(abstract["opt_state"], arrays["opt_state"], "optimizer state")
    state = {"params": params, "opt_state": opt_state, "step": np.asarray(step, np.int32),
             "rng": np.asarray(manifest["rng"], np.uint32)}
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(run_dir, keep=target.train.keep_checkpoints, async_save=False)
    try:
        ckpt.save(step, jax.device_put(state), model=target.model,
                  data_iter=_IteratorState(manifest["data_iterator"].encode()), force=True)
    finally:
        ckpt.close()
    (run_dir / "config.json").write_text(target.to_json())
    note = {"step": step, "bundle": str(_abs(bundle)), "commit": manifest["commit"], "params_dtype": manifest["params_dtype"],
            "optimizer_dtype": manifest["optimizer_dtype"]}
    (run_dir / IMPORTED).write_text(json.dumps(note, indent=1))
    say(f"imported {_abs(bundle)} into {run_dir} at step {step}: parameters {manifest['params_dtype']} -> float32, "
        + (f"optimizer state {manifest['optimizer_dtype']}" if manifest["optimizer_dtype"] else
           "NO optimizer state in the bundle: the optimizer restarts (Adam moments zero)"))
    return step


def import_note(run_dir, step: int) -> str | None:
    """One line for train.py when it resumes at a step that an import without optimizer state wrote."""
    path = pathlib.Path(run_dir) / IMPORTED
    try:
        note = json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None
    if not note or note.get("step") != step or note.get("optimizer_dtype"):
        return None
    return (f"step {step} was imported from bundle {note.get('bundle')} without optimizer state: "
            "the optimizer restarts here (Adam moments zero)")


# --- regroup --------------------------------------------------------------------------------------


def regroup_names(old: tuple[int, ...], new: tuple[int, ...]) -> dict[str, str]:
    """Parameter-path prefixes of the new layout -> those of the old one, for decoder_layers `old` and
    `new` with the same lower layers and the same number of upper layers. Upper layer j (counted across
    groups) keeps its weights; group g's landmark norm comes from the old group of its first layer."""
    if old[0] != new[0] or sum(old[1:]) != sum(new[1:]) or len(old) < 2 or len(new) < 2:
        raise BundleError(f"decoder_layers {tuple(new)} is not a regrouping of {tuple(old)}: keep the lower layers "
                          "and the number of upper layers")
    place = [(g, i) for g, n in enumerate(old[1:]) for i in range(n)]
    mapping, j = {}, 0
    for g, n in enumerate(new[1:]):
        if n:
            mapping[f"['landmark_norm_g{g}']"] = f"['landmark_norm_g{place[j][0]}']"
        for i in range(n):
            og, oi = place[j]
            mapping[f"['group{g}_layer_{i}']"] = f"['group{og}_layer_{oi}']"
            j += 1
    return mapping


def regroup_bundle(bundle, target: RunConfig, out) -> str:
    """Writes to `out` the bundle's parameters re-cut into target.model's retrieval groups (a bundle of
    `target`, without optimizer state). Returns a one-line summary."""
    manifest, run, files = read_bundle(bundle)
    old, new = tuple(run.model.decoder_layers), tuple(target.model.decoder_layers)
    problem = model_mismatch({**dataclasses.asdict(run.model), "decoder_layers": new, "name": target.model.name},
                             target.model)
    if problem:
        raise BundleError(f"the target differs from the bundle's model beyond decoder_layers ({problem}); "
                          "set it to the bundle's value")
    prefixes = regroup_names(old, new)
    params = {e["name"]: unpack(e, files) for e in manifest["tensors"] if e["group"] == "params"}
    arrays = []
    for name in _param_names(target):
        source = name
        for new_prefix, old_prefix in prefixes.items():
            if name.startswith(new_prefix):
                source = name.replace(new_prefix, old_prefix, 1)
                break
        if source not in params:
            raise BundleError(f"the bundle has no parameter {source} for {name}; regroup a bundle of the same model")
        arrays.append(("params", name, params[source]))
    packed, entries = pack(arrays, max(len(f) for f in files))
    out = _abs(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise BundleError(f"{out} is not empty; pass a new or empty --out folder")
    for i, f in enumerate(packed):
        (out / _file_name(i)).write_bytes(f)
    (out / CONFIG).write_text(target.to_json())
    (out / MANIFEST).write_text(json.dumps({
        **manifest, "optimizer_dtype": None, "tensors": entries, "regrouped_from": [str(_abs(bundle)), list(old)],
        "files": {_file_name(i): {"bytes": len(f), "crc32": zlib.crc32(f)} for i, f in enumerate(packed)},
    }, indent=1))
    return (f"bundle {out}: the parameters of {_abs(bundle)} (step {manifest['step']}) with decoder_layers {old} -> {new}; "
            "no optimizer state; start a run from it with train.init_from (segment.py --init-bundle)")


def _param_names(run: RunConfig) -> list[str]:
    abstract, _ = _abstract_state(run)
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(abstract["params"])[0]]


# --- command line ---------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drt_jax.train.bundle", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="a run's checkpoint -> a bundle folder")
    ex.add_argument("--run-dir", required=True)
    ex.add_argument("--step", type=int, help="default: the newest readable checkpoint")
    ex.add_argument("--out", required=True, help="a new or empty folder")
    ex.add_argument("--max-files", type=int, default=8)
    ex.add_argument("--max-file-mib", type=float, default=16)
    im = sub.add_parser("import", help="a bundle folder -> a checkpoint train.py resumes from")
    im.add_argument("--bundle", required=True)
    im.add_argument("--run-dir", required=True)
    im.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (not the model)")
    rg = sub.add_parser("regroup", help="a DRT bundle -> a bundle of the same layers in other retrieval groups")
    rg.add_argument("--bundle", required=True)
    rg.add_argument("--config", required=True, help="the target run config (its model.decoder_layers is the new layout)")
    rg.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the target config")
    rg.add_argument("--out", required=True, help="a new or empty folder")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            print(export_bundle(args.run_dir, args.out, step=args.step, max_files=args.max_files, max_file_mib=args.max_file_mib))
        elif args.command == "regroup":
            from drt_jax.train.config import load_run_config
            print(regroup_bundle(args.bundle, load_run_config(args.config, args.set), args.out))
        else:
            import_bundle(args.bundle, args.run_dir, args.set)
    except (BundleError, CheckpointError, ConfigError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
