"""The job manifest, `OUT/_manifest.json`: what job an output directory holds and which shards
are complete, so that rerunning the same job resumes it and a different job is refused."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ternpool.engine.identity import file_role, model_digests

from . import storage
from .errors import JobInputError
from .inputs import InputSet
from .plan import Shard
from .spec import JobSpec
from .storage import MANIFEST_FILE, part_name

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_REQUIRED_KEYS = ("format_version", "inputs", "model", "sampling", "num_shards", "num_rows",
                  "completed", "job_id", "created")


def _jsonable(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists), for exact comparisons."""
    return json.loads(json.dumps(value))


def _about(spec: JobSpec, inputs: InputSet) -> dict[str, Any]:
    return {"input_uri": inputs.uri, "text_column": inputs.text_column,
            "model_name": spec.model.rstrip("/").rsplit("/", 1)[-1], "output_format": spec.output_format}


def _sampling_record(spec: JobSpec) -> dict[str, Any]:
    return {**spec.sampling_defaults(), "shard_rows": spec.shard_rows, "truncate": spec.truncate}


@dataclass
class Manifest:
    """What an output directory holds: inputs, model, sampling, plan size and completed shards."""

    output: str
    inputs: list[dict]  # InputSet.fingerprint()
    model: dict  # model fingerprint (given by the caller)
    sampling: dict  # JobSpec.sampling_defaults() + {"shard_rows", "truncate"}
    num_shards: int
    num_rows: int
    # shard_id -> {"rows": n, "file": part name, "failed_rows": k}
    completed: dict[int, dict] = field(default_factory=dict)
    job_id: str = ""
    created: float = 0.0
    finished: float | None = None
    # the cost figures of the run that last ended (ternpool.cluster.cost.JobCost.to_dict()), None before
    cost: dict | None = field(default=None, compare=False)
    resumed: bool = field(default=False, compare=False)  # found in OUT by for_job (not saved)
    # what the OpenAI output files and `ternpool export` need from the job (informative: not compared)
    about: dict = field(default_factory=dict)  # {"input_uri", "text_column", "model_name", "output_format"}

    @classmethod
    def open(cls, output: str, spec: JobSpec, inputs: InputSet, plan: list[Shard],
             model: dict) -> "Manifest":
        """`for_job`, then `create`: the manifest of this job in `output`, saved."""
        manifest = cls.for_job(output, spec, inputs, plan, model)
        manifest.create()
        return manifest

    @classmethod
    def for_job(cls, output: str, spec: JobSpec, inputs: InputSet, plan: list[Shard],
                model: dict) -> "Manifest":
        """The manifest of `output` for this job, writing nothing: a new one (not yet saved) when
        the directory has none, or the existing one to resume when it describes the same job.
        JobInputError when ternpool may not write `output` (ownership.check_output) or saying what
        differs when the directory holds a different job."""
        from .ownership import check_output  # ownership -> inputs; kept out of the import-time graph

        output = storage.normalize(output)  # actors may run in another working directory
        wanted = cls(
            output=output,
            inputs=_jsonable(inputs.fingerprint()),
            model=_jsonable(model),
            sampling=_jsonable(_sampling_record(spec)),
            num_shards=len(plan),
            num_rows=inputs.num_rows,
            completed={},
            job_id=uuid.uuid4().hex,
            created=time.time(),
            about=_about(spec, inputs),
        )
        fs, base = storage.resolve(output)
        if not storage.exists(fs, storage.join(base, MANIFEST_FILE)):
            check_output(output, inputs, len(plan), None)
            return wanted
        existing = cls.load(output)
        differences = existing._differences(wanted)
        if differences:
            raise JobInputError(
                f"output {output} holds a different job (job_id {existing.job_id}): "
                + "; ".join(differences)
                + ". Use a new --output directory (or delete this one) to run this job.")
        check_output(output, inputs, existing.num_shards, set(existing.completed))
        existing._forget_missing_parts()
        if existing.finished is not None and len(existing.done_shards()) < existing.num_shards:
            existing.finished = None
        existing.resumed = True
        existing.about = wanted.about  # the options of this run (e.g. --output-format)
        return existing

    def create(self) -> None:
        """Write this manifest into its output, creating the directory: the first write of a job
        into OUT, made once every check has passed."""
        try:
            self.save()
        except OSError as exc:
            raise JobInputError(f"cannot write the job manifest in output {self.output}: "
                                f"{exc}") from None
        if self.resumed:
            log.info("job %s: resuming in %s, %d of %d shards done", self.job_id, self.output,
                     len(self.done_shards()), self.num_shards)
        else:
            log.info("job %s: new output %s, %d shards, %d rows", self.job_id, self.output,
                     self.num_shards, self.num_rows)

    def _differences(self, wanted: "Manifest") -> list[str]:
        """What differs between this (stored) manifest and the job `wanted` describes."""
        out: list[str] = []
        old_inputs = {f["path"]: f for f in self.inputs}
        new_inputs = {f["path"]: f for f in wanted.inputs}
        for path in old_inputs.keys() - new_inputs.keys():
            out.append(f"input {path} is no longer among the inputs")
        for path in new_inputs.keys() - old_inputs.keys():
            out.append(f"input {path} was not among the inputs")
        for path in sorted(old_inputs.keys() & new_inputs.keys()):
            old, new = old_inputs[path], new_inputs[path]
            changes = [f"{k} {old.get(k)!r} -> {new.get(k)!r}"
                       for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
            if changes:
                out.append(f"input {path} changed ({', '.join(changes)})")
        if not out and [f["path"] for f in self.inputs] != [f["path"] for f in wanted.inputs]:
            out.append("the input files are in a different order")
        by_content = isinstance(wanted.model, dict) and "files" in wanted.model  # model_fingerprint's
        if by_content:
            out += model_changes(self.model if isinstance(self.model, dict) else {}, wanted.model)
        for name in ("sampling",) if by_content else ("model", "sampling"):
            old, new = getattr(self, name), getattr(wanted, name)
            for key in sorted(old.keys() | new.keys()):
                if old.get(key) != new.get(key):
                    out.append(f"{name} {key} changed ({old.get(key)!r} -> {new.get(key)!r})")
        for name in ("num_shards", "num_rows"):
            old, new = getattr(self, name), getattr(wanted, name)
            if old != new:
                out.append(f"{name} changed ({old} -> {new})")
        return out

    def _forget_missing_parts(self) -> None:
        """Completed shards whose part file has gone are done again rather than lost."""
        fs, base = storage.resolve(self.output)
        for shard_id in sorted(self.completed):
            name = self.completed[shard_id].get("file") or part_name(shard_id)
            if not storage.exists(fs, storage.join(base, name)):
                log.warning("shard %d is recorded as complete but %s is missing; it will run "
                            "again", shard_id, name)
                del self.completed[shard_id]

    def done_shards(self) -> set[int]:
        """The completed shard ids within the plan."""
        return {s for s in self.completed if 0 <= s < self.num_shards}

    def is_done(self, shard_id: int) -> bool:
        return shard_id in self.completed

    def record(self, shard_id: int, rows: int, failed_rows: int, save: bool = True,
               prompt_tokens: int | None = None, generated_tokens: int | None = None,
               cached_tokens: int = 0) -> None:
        """Mark a shard complete (its part file written) and, unless `save=False`, save the manifest
        atomically. When every shard of the plan is complete, `finished` is set too; with `save=False`
        the caller saves (the coordinator saves at once when it writes the last shard).

        A shard written but not yet saved as complete (the coordinator batches saves) is simply done
        again on resume: its part file has a fixed name, so the new one replaces it."""
        shard_id = int(shard_id)
        self.completed[shard_id] = {"rows": int(rows), "file": part_name(shard_id), "failed_rows": int(failed_rows)}
        if prompt_tokens is not None:  # tokens of the shard's rows without an error (a resumed summary adds them up)
            self.completed[shard_id].update(prompt_tokens=int(prompt_tokens),
                                            generated_tokens=int(generated_tokens or 0),
                                            cached_tokens=int(cached_tokens))
        if self.finished is None and len(self.completed) >= self.num_shards \
                and len(self.done_shards()) == self.num_shards:
            self.finished = time.time()
        if save:
            self.save()

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "output": self.output,
            "inputs": self.inputs,
            "model": self.model,
            "sampling": self.sampling,
            "num_shards": self.num_shards,
            "num_rows": self.num_rows,
            "completed": {str(k): v for k, v in sorted(self.completed.items())},
            "job_id": self.job_id,
            "created": self.created,
            "finished": self.finished,
            "about": self.about,
            **({} if self.cost is None else {"cost": self.cost}),
        }

    def save(self) -> None:
        """Write `_manifest.json.tmp`, then rename it onto `_manifest.json` (atomic)."""
        fs, base = storage.resolve(self.output)
        # compact: json's C encoder only runs without indent (16 ms a save at 1,000 shards with indent=1)
        data = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode("utf-8")
        storage.write_bytes_atomic(fs, storage.join(base, MANIFEST_FILE), data,
                                   tmp_path=storage.join(base, MANIFEST_FILE + ".tmp"))

    @classmethod
    def load(cls, output: str) -> "Manifest":
        """The manifest in `output`. JobInputError naming the path when it is missing, corrupt
        or of another format version."""
        fs, base = storage.resolve(output)
        path = storage.join(base, MANIFEST_FILE)
        try:
            raw = storage.read_bytes(fs, path)
        except OSError as exc:
            raise JobInputError(f"cannot read job manifest {path}: {exc}") from None
        if raw is None:
            raise JobInputError(f"no job manifest at {path}: {output} is not a ternpool output "
                                "directory, or its job never started")
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise JobInputError(f"job manifest {path} is corrupt (not JSON: {exc})") from None
        if not isinstance(data, dict):
            raise JobInputError(f"job manifest {path} is corrupt: expected a JSON object, "
                                f"found {type(data).__name__}")
        missing = [k for k in _REQUIRED_KEYS if k not in data]
        if missing:
            raise JobInputError(f"job manifest {path} is corrupt: missing key(s) {missing}")
        if data["format_version"] != FORMAT_VERSION:
            raise JobInputError(f"job manifest {path} has format version "
                                f"{data['format_version']!r}; this ternpool reads version "
                                f"{FORMAT_VERSION}. Use a new --output directory.")
        try:
            completed = {int(k): dict(v) for k, v in data["completed"].items()}
        except (AttributeError, TypeError, ValueError) as exc:
            raise JobInputError(f"job manifest {path} is corrupt: bad 'completed' "
                                f"({exc})") from None
        return cls(output=storage.normalize(output), inputs=data["inputs"], model=data["model"],
                   sampling=data["sampling"], num_shards=data["num_shards"],
                   num_rows=data["num_rows"], completed=completed, job_id=data["job_id"],
                   created=data["created"], finished=data.get("finished"), cost=data.get("cost"),
                   about=data.get("about") if isinstance(data.get("about"), dict) else {})


def model_fingerprint(model_dir: str) -> dict[str, Any]:
    """What identifies a local model directory: the sha256 of every file it is made of (weights,
    config, tokenizer, chat template: `engine.identity.model_files`; hashed once and cached) and of
    the chat template inside tokenizer_config.json, if any."""
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise JobInputError(f"model {model_dir}: no config.json (not a model directory)")
    try:
        files = model_digests(model_dir)
    except OSError as exc:
        raise JobInputError(f"model {model_dir}: cannot read {exc.filename or 'a file'} ({exc})") from None
    template = None
    try:
        with open(os.path.join(model_dir, "tokenizer_config.json"), "rb") as handle:
            config = json.loads(handle.read())
        if isinstance(config, dict) and config.get("chat_template") is not None:
            template = hashlib.sha256(json.dumps(config["chat_template"], sort_keys=True).encode()).hexdigest()
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        raise JobInputError(f"model {model_dir}: cannot read tokenizer_config.json ({exc})") from None
    return {"files": files, "chat_template": template}


def model_changes(old: dict, new: dict) -> list[str]:
    """What changed between two model fingerprints, by role: 'model weights changed
    (model.safetensors)', 'tokenizer changed (tokenizer.json)', 'chat template changed', ..."""
    if "files" not in old:
        return ["the model was identified by an older ternpool (file names and sizes, not content)"]
    changed: dict[str, list[str]] = {}
    old_files, new_files = old.get("files", {}), new.get("files", {})
    template_changed = old.get("chat_template") != new.get("chat_template")
    for name in sorted(old_files.keys() | new_files.keys()):
        if old_files.get(name) == new_files.get(name):
            continue
        role = file_role(name)
        if name == "tokenizer_config.json" and template_changed:
            role = "chat template"
        what = name if name in old_files and name in new_files else \
            f"{name} {'removed' if name in old_files else 'added'}"
        changed.setdefault(role, []).append(what)
    if template_changed and "chat template" not in changed:
        changed["chat template"] = []
    return [f"{role} changed" + (f" ({', '.join(names)})" if names else "")
            for role, names in changed.items()]
