"""Where the exported weights come from: an official-layout checkpoint, or a seeded random init.

Official layout (a copy of the Hugging Face repo, local directory or s3:// prefix):

    ve.safetensors       VoiceEncoder (no prefix)
    t3_cfg.safetensors   T3; also accepted: keys wrapped as `model.0.*` (the `["model"][0]`
                         layout flattened), a torch pickle under that name, or `t3_cfg.pt`
                         (a torch pickle, plain or `{"model": [state_dict]}`) when the
                         .safetensors is absent
    s3gen.safetensors    tokenizer.* / speaker_encoder.* / flow.* / mel2wav.* (see s3gen.py)
    tokenizer.json       English text tokenizer (`tokenizers` format)
    conds.pt             optional default voice (official `Conditionals`)

Every file's keys and shapes are checked against our modules (built on the meta
device) before anything is loaded; problems raise `CheckpointError` naming the
file and the keys, with hints from the released layout (official_layout.py): a
file holding another file's keys, or released full-size shapes against another
size config.  Modules are built and loaded one at a time (`load(component)`),
so a full-size export holds at most one sub-model in memory.
"""
from __future__ import annotations

import dataclasses
import hashlib
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from actors.bundle import sha256_file
from actors.storage import StorageOptions, is_s3, join
from export.chatterbox import s3gen as s3gen_mod
from export.chatterbox.config import build_config, load_preset
from export.chatterbox.hift import build_hift
from export.chatterbox.official_layout import matching_file, official_layout
from export.chatterbox.s3gen import S3GenConfig
from export.chatterbox.t3 import T3, T3Config, seeded_init
from export.chatterbox.voice_encoder import VoiceEncoder, VoiceEncoderConfig

VE_FILE = "ve.safetensors"
T3_FILE = "t3_cfg.safetensors"
T3_PT_FILE = "t3_cfg.pt"
S3GEN_FILE = "s3gen.safetensors"
TOKENIZER_FILE = "tokenizer.json"
CONDS_FILE = "conds.pt"

# Loadable units, in export order, and the checkpoint file each comes from.
COMPONENTS = ("ve", "t3", "tokenizer", "speaker_encoder", "flow", "estimator", "mel2wav")
COMPONENT_FILE = {"ve": VE_FILE, "t3": T3_FILE, "tokenizer": S3GEN_FILE, "speaker_encoder": S3GEN_FILE,
                  "flow": S3GEN_FILE, "estimator": S3GEN_FILE, "mel2wav": S3GEN_FILE}
T3_WRAP_PREFIX = "model.0."
_LIST_LIMIT = 8


class CheckpointError(Exception):
    """A checkpoint file is missing, unreadable or does not fit the model; the message names it."""


# --------------------------------------------------------------------------- model sizes


@dataclasses.dataclass
class ModelConfig:
    """All component configs of one Chatterbox model (a preset's sections, resolved)."""

    voice_encoder: VoiceEncoderConfig
    t3: T3Config
    s3gen: S3GenConfig

    @classmethod
    def from_sections(cls, sections: dict[str, dict[str, Any]]) -> "ModelConfig":
        known = {"voice_encoder", "t3", "s3tokenizer", "campplus", "flow", "cfm", "hift"}
        unknown = sorted(set(sections) - known)
        if unknown:
            raise ValueError(f"unknown config sections {unknown} (known: {sorted(known)})")
        return cls(voice_encoder=build_config(VoiceEncoderConfig, sections.get("voice_encoder")),
                   t3=build_config(T3Config, sections.get("t3")),
                   s3gen=S3GenConfig.from_preset(sections))

    @classmethod
    def from_preset(cls, name_or_path: str) -> "ModelConfig":
        return cls.from_sections(load_preset(name_or_path))

    def sections(self) -> dict[str, dict[str, Any]]:
        """JSON-able sections, enough to rebuild this config with `from_sections`."""
        s = self.s3gen
        return {"voice_encoder": dataclasses.asdict(self.voice_encoder), "t3": dataclasses.asdict(self.t3),
                "s3tokenizer": dataclasses.asdict(s.s3tokenizer), "campplus": dataclasses.asdict(s.campplus),
                "flow": dataclasses.asdict(s.flow), "cfm": dataclasses.asdict(s.cfm),
                "hift": dataclasses.asdict(s.hift)}


def build_component(name: str, cfg: ModelConfig) -> nn.Module:
    """An un-loaded module for one component (default init)."""
    if name == "ve":
        return VoiceEncoder(cfg.voice_encoder)
    if name == "t3":
        return T3(cfg.t3)
    return s3gen_mod.build_section(name, cfg.s3gen)


def component_shapes(name: str, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Expected state-dict keys (file naming) and shapes of one component, without allocating."""
    with torch.device("meta"):
        model = build_component(name, cfg)
    prefix = "" if name in ("ve", "t3") else s3gen_mod.section_prefix(name)
    return {prefix + k: tuple(v.shape) for k, v in model.state_dict().items()}


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over the state dict (sorted names, dtypes, shapes and bytes): equal iff same weights."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        t = value.detach().contiguous().cpu().reshape(-1)
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _format_list(items: list, what: str) -> str:
    shown = ", ".join(str(x) for x in items[:_LIST_LIMIT])
    more = f" (+{len(items) - _LIST_LIMIT} more)" if len(items) > _LIST_LIMIT else ""
    return f"{len(items)} {what}: {shown}{more}"


def check_shapes(label: str, expected: dict[str, tuple[int, ...]], got: dict[str, tuple[int, ...]],
                 optional: tuple[str, ...] = (), file: str | None = None) -> None:
    """Raise CheckpointError naming missing, unexpected and wrongly shaped keys.

    `file` names the official checkpoint file `got` should follow (`t3_cfg.safetensors`,
    ...); the message then also says what the released layout suggests went wrong.
    """
    missing = sorted(set(expected) - set(got) - set(optional))
    unexpected = sorted(set(got) - set(expected))
    wrong_keys = [k for k in sorted(expected) if k in got and tuple(got[k]) != tuple(expected[k])]
    wrong = [f"{k} (expected {list(expected[k])}, got {list(got[k])})" for k in wrong_keys]
    problems = []
    if missing:
        problems.append(_format_list(missing, "missing keys"))
        problems.append(f"{len(set(expected) & set(got))} of the {len(expected)} expected keys present")
    if unexpected:
        problems.append(_format_list(unexpected, "unexpected keys"))
    if wrong:
        problems.append(_format_list(wrong, "keys with the wrong shape"))
    if problems and file is not None:
        problems += _layout_hints(file, expected, got, wrong_keys)
    if problems:
        raise CheckpointError(f"{label}: " + "; ".join(problems))


def _layout_hints(file: str, expected: dict[str, tuple[int, ...]], got: dict[str, tuple[int, ...]],
                  wrong_keys: list[str]) -> list[str]:
    """What the released layout says about a mismatch: a misnamed file, or a size-config mismatch."""
    other = matching_file(got)
    if other is not None and other != file:
        return [f"its keys are those of the official {other}, not {file}: misnamed file?"]
    if not wrong_keys:
        return []
    released = official_layout()[file]
    if all(released.get(k) == list(got[k]) for k in wrong_keys):
        return ["the file has the released full-size shapes but the model config does not: "
                "use the full size preset"]
    if all(released.get(k) == list(expected[k]) for k in wrong_keys):
        return ["the model config has the released full-size shapes but the file does not: "
                "it holds a model of other sizes, so use a config of its sizes"]
    return []


# --------------------------------------------------------------------------- tensor files


def _legacy_weight_norm(key: str) -> str:
    """Old-style weight_norm names (`weight_g`/`weight_v`) -> parametrization names, as torch's own
    load hook renames them."""
    if key.endswith(".weight_g"):
        return key[: -len("weight_g")] + "parametrizations.weight.original0"
    if key.endswith(".weight_v"):
        return key[: -len("weight_v")] + "parametrizations.weight.original1"
    return key


class TensorFile:
    """Named tensors of one checkpoint file (safetensors, read lazily; or a torch pickle).

    Keys are normalised: a `model.0.` wrapper (flattened `["model"][0]`) is stripped
    when every key carries it, `{"model": [state_dict]}` pickles are unwrapped, and
    legacy weight-norm names are renamed.  `layout` records which of these applied.
    """

    def __init__(self, path: Path, label: str):
        self.path, self.label = Path(path), label
        self.layout = "safetensors"
        self._st = None
        self._tensors: dict[str, torch.Tensor] | None = None
        try:
            from safetensors import safe_open
            self._st = safe_open(str(self.path), framework="pt", device="cpu")
            raw_keys = list(self._st.keys())
        except Exception as e:  # noqa: BLE001 - any parse failure means "not readable"
            if not zipfile.is_zipfile(self.path):
                raise CheckpointError(f"{label} is not a readable safetensors file ({type(e).__name__}: {e})") \
                    from None
            self._tensors = self._load_pickle()
            raw_keys = list(self._tensors)
        if raw_keys and all(k.startswith(T3_WRAP_PREFIX) for k in raw_keys):
            self.layout += f" (keys wrapped as {T3_WRAP_PREFIX}*)"
            self._names = {k[len(T3_WRAP_PREFIX):]: k for k in raw_keys}
        else:
            self._names = {k: k for k in raw_keys}
        renamed = {_legacy_weight_norm(k): v for k, v in self._names.items()}
        if len(renamed) != len(self._names):
            raise CheckpointError(f"{label}: both legacy and current weight-norm names for the same weight")
        if renamed.keys() != self._names.keys():
            self.layout += " (legacy weight_norm names)"
        self._names = renamed

    def _load_pickle(self) -> dict[str, torch.Tensor]:
        try:
            if self.path.suffix == ".safetensors":   # torch.load would read the name as a format hint
                with open(self.path, "rb") as f:
                    obj = torch.load(f, map_location="cpu", weights_only=True)
            else:
                obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{self.label} is not a readable safetensors file or torch checkpoint "
                                  f"({type(e).__name__}: {e})") from None
        self.layout = "torch pickle"
        if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], (list, tuple)):
            if not obj["model"]:
                raise CheckpointError(f"{self.label}: 'model' holds an empty list")
            obj = obj["model"][0]
            self.layout += ' (wrapped as ["model"][0])'
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{self.label}: not a state dict (a mapping of names to tensors)")
        return dict(obj)

    def keys(self) -> list[str]:
        return list(self._names)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        if self._tensors is not None:
            return {k: tuple(self._tensors[raw].shape) for k, raw in self._names.items()}
        return {k: tuple(self._st.get_slice(raw).get_shape()) for k, raw in self._names.items()}

    def get(self, key: str) -> torch.Tensor:
        raw = self._names[key]
        try:
            if self._tensors is not None:
                return self._tensors[raw]
            return self._st.get_tensor(raw)
        except Exception as e:  # noqa: BLE001 - truncated data etc.
            raise CheckpointError(f"{self.label}: cannot read tensor {key} ({type(e).__name__}: {e})") from None

    def dtypes(self) -> list[str]:
        if self._tensors is not None:
            return sorted({str(t.dtype).removeprefix("torch.") for t in self._tensors.values()})
        return sorted({self._st.get_slice(raw).get_dtype() for raw in self._names.values()})


def copy_into(model: nn.Module, file: TensorFile, prefix: str = "") -> None:
    """Copy `prefix + name` of `file` into each state-dict entry of `model`, in place (one tensor at
    a time: no second copy of the weights).  Call after `check_shapes`; converts dtype."""
    targets = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, target in targets.items():
            key = prefix + name
            if key not in file._names:      # computed buffers: checked as optional by the caller
                continue
            target.copy_(file.get(key))


# --------------------------------------------------------------------------- sources


class Source:
    """Where weights come from; `load(component)` returns an eval-mode fp32 module."""

    cfg: ModelConfig

    def load(self, component: str) -> nn.Module:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def text_tokenizer(self, dest: Path) -> None:
        raise NotImplementedError

    def default_voice(self) -> dict[str, np.ndarray] | None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class RandomInit(Source):
    """Seeded random weights (tests, benchmarks): the same config and seed give the same weights."""

    def __init__(self, cfg: ModelConfig, seed: int = 0, preset: str | None = None):
        self.cfg, self.seed, self.preset = cfg, int(seed), preset

    def component_seed(self, component: str) -> int:
        return self.seed * 1000 + COMPONENTS.index(component) + 1

    def load(self, component: str) -> nn.Module:
        if component not in COMPONENTS:
            raise KeyError(f"no component {component!r}")
        seed = self.component_seed(component)
        if component == "t3":
            return seeded_init(T3(self.cfg.t3), seed=seed)
        if component == "mel2wav":
            return build_hift(self.cfg.s3gen.hift, seed=seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_component(component, self.cfg)
            if component == "speaker_encoder":
                _calibrate_batchnorm(model, self.cfg.s3gen.campplus.feat_dim)
            return model.eval()

    def describe(self) -> dict[str, Any]:
        return {"kind": "random-init", "preset": self.preset, "seed": self.seed}

    def text_tokenizer(self, dest: Path) -> None:
        from export.chatterbox.text_tokenizer import write_synthetic_tokenizer
        write_synthetic_tokenizer(dest, self.cfg.t3)

    def default_voice(self) -> dict[str, np.ndarray]:
        return synthetic_voice(self.cfg, self.seed)


def _calibrate_batchnorm(model: nn.Module, feat_dim: int) -> None:
    """Set batch-norm running statistics from one seeded random fbank batch.

    With default statistics (mean 0, var 1) a randomly initialised CAM++ shrinks its
    activations layer after layer to an x-vector of ~1e-4, which makes every absolute
    tolerance vacuous; calibrated statistics keep activations O(1) as in a trained model.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None                  # cumulative average over the calibration pass
    x = torch.randn(4, 300, feat_dim) * 2.0
    x = x - x.mean(dim=1, keepdim=True)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the statistics are weights: they must not depend on the thread count
    try:
        with torch.no_grad():
            model(x)
    finally:
        torch.set_num_threads(threads)
    for bn in bns:
        bn.momentum = 0.1
    model.eval()


class Checkpoint(Source):
    """An official-layout checkpoint in a local directory or under an s3:// prefix.

    S3 files are downloaded (once each, when first needed) into a temporary
    directory that `close()` removes.
    """

    def __init__(self, location: str, cfg: ModelConfig, storage: StorageOptions | None = None):
        self.location = location if is_s3(location) else str(Path(location).expanduser().resolve())
        self.cfg = cfg
        self.storage = storage or StorageOptions.from_env()
        self._tmp: Path | None = None
        self._paths: dict[str, Path] = {}
        self._hashes: dict[str, str] = {}
        self._files: dict[str, TensorFile] = {}
        self._layouts: dict[str, str] = {}
        if is_s3(self.location):
            self._fs, self._prefix = self.storage.resolve(self.location)
        else:
            root = Path(self.location)
            if not root.is_dir():
                raise CheckpointError(f"checkpoint directory {root} does not exist")

    # ---- files
    def exists(self, name: str) -> bool:
        if not is_s3(self.location):
            return (Path(self.location) / name).is_file()
        import pyarrow.fs as pafs
        try:
            return self._fs.get_file_info(join(self._prefix, name)).type == pafs.FileType.File
        except OSError as e:
            raise CheckpointError(f"checkpoint {self.location}: cannot list {name} ({e})") from None

    def path(self, name: str) -> Path:
        """Local path of a checkpoint file (downloaded from S3 if needed); CheckpointError if missing."""
        if name in self._paths:
            return self._paths[name]
        if not self.exists(name):
            raise CheckpointError(f"checkpoint {self.location}: missing file {name}")
        if not is_s3(self.location):
            path = Path(self.location) / name
        else:
            if self._tmp is None:
                self._tmp = Path(tempfile.mkdtemp(prefix="voxray-ckpt-"))
            path = self._tmp / name
            try:
                with self._fs.open_input_stream(join(self._prefix, name)) as src, open(path, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 22)
            except OSError as e:
                raise CheckpointError(f"checkpoint {self.location}: cannot download {name} ({e})") from None
        self._paths[name] = path
        return path

    def sha256(self, name: str) -> str:
        if name not in self._hashes:
            self._hashes[name] = sha256_file(self.path(name))
        return self._hashes[name]

    def label(self, name: str) -> str:
        return f"{join(self.location, name)}"

    def tensor_file(self, name: str) -> TensorFile:
        if name == T3_FILE and not self.exists(T3_FILE) and self.exists(T3_PT_FILE):
            name = T3_PT_FILE
        if name not in self._files:
            self._files[name] = TensorFile(self.path(name), self.label(name))
            self.sha256(name)
            self._layouts[name] = self._files[name].layout
        return self._files[name]

    # ---- checks
    def check(self) -> None:
        """Check every required file's presence and key set (no tensor data is read)."""
        for name in (VE_FILE, S3GEN_FILE, TOKENIZER_FILE):
            self.path(name)
        if not self.exists(T3_FILE) and not self.exists(T3_PT_FILE):
            raise CheckpointError(f"checkpoint {self.location}: missing file {T3_FILE}")
        self._check_file(VE_FILE)
        self._check_file(T3_FILE)
        self._check_file(S3GEN_FILE)
        self.text_tokenizer(None)
        self.default_voice()

    def _check_file(self, name: str) -> None:
        file = self.tensor_file(name)
        if name == VE_FILE:
            expected, optional = component_shapes("ve", self.cfg), ()
        elif name == T3_FILE:
            expected, optional = component_shapes("t3", self.cfg), ()
        else:
            expected = s3gen_mod.expected_shapes(self.cfg.s3gen)
            optional = s3gen_mod.COMPUTED_BUFFERS
        check_shapes(file.label, expected, file.shapes(), optional=optional, file=name)

    # ---- Source
    def load(self, component: str) -> nn.Module:
        name = COMPONENT_FILE[component]
        file = self.tensor_file(name)
        model = build_component(component, self.cfg)
        prefix = "" if component in ("ve", "t3") else s3gen_mod.section_prefix(component)
        expected = {prefix + k: tuple(v.shape) for k, v in model.state_dict().items()}
        got = {k: v for k, v in file.shapes().items() if k.startswith(prefix)}
        if component == "flow":      # the estimator is its own component
            got = {k: v for k, v in got.items() if not k.startswith(s3gen_mod.ESTIMATOR_PREFIX)}
        optional = s3gen_mod.COMPUTED_BUFFERS if component == "tokenizer" else ()
        check_shapes(file.label, expected, got, optional=optional, file=name)
        copy_into(model, file, prefix)
        return model.eval()

    def describe(self) -> dict[str, Any]:
        files = {}
        for name in (VE_FILE, T3_FILE, T3_PT_FILE, S3GEN_FILE, TOKENIZER_FILE, CONDS_FILE):
            if name in self._paths:
                files[name] = self.sha256(name)
        return {"kind": "checkpoint", "location": self.location, "files": files,
                "layouts": dict(self._layouts)}

    def text_tokenizer(self, dest: Path | None) -> None:
        from export.chatterbox.text_tokenizer import check_tokenizer
        path = self.path(TOKENIZER_FILE)
        self.sha256(TOKENIZER_FILE)
        check_tokenizer(path, self.cfg.t3, self.label(TOKENIZER_FILE))
        if dest is not None:
            shutil.copyfile(path, dest)

    def default_voice(self) -> dict[str, np.ndarray] | None:
        if not self.exists(CONDS_FILE):
            return None
        self.sha256(CONDS_FILE)
        return read_conds(self.path(CONDS_FILE), self.cfg, self.label(CONDS_FILE))

    def close(self) -> None:
        self._files.clear()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
            self._paths.clear()


# --------------------------------------------------------------------------- default voice

# npz keys of the default-voice asset: official Conditionals fields, batch axis kept (1).
VOICE_KEYS = {
    "t3_speaker_emb": "T3Cond.speaker_emb [1, 256] float32 (VoiceEncoder utterance embedding)",
    "t3_cond_prompt_speech_tokens": "T3Cond.cond_prompt_speech_tokens [1, L<=150] int64",
    "t3_emotion_adv": "T3Cond.emotion_adv [1] float32 (exaggeration the voice was saved with)",
    "gen_prompt_token": "gen.prompt_token [1, T] int64 (S3 tokens of the S3Gen prompt)",
    "gen_prompt_token_len": "gen.prompt_token_len [1] int64",
    "gen_prompt_feat": "gen.prompt_feat [1, 2T, 80] float32 (prompt mel, 24 kHz)",
    "gen_prompt_feat_len": "gen.prompt_feat_len [1] int64",
    "gen_embedding": "gen.embedding [1, 192] float32 (CAMPPlus x-vector)",
}


def _arr(value: Any, dtype, label: str, what: str) -> np.ndarray:
    if value is None:
        raise CheckpointError(f"{label}: {what} is missing")
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().float() if value.is_floating_point() else value.detach().cpu()
        value = value.numpy()
    return np.asarray(value).astype(dtype)


def read_conds(path: Path, cfg: ModelConfig, label: str) -> dict[str, np.ndarray]:
    """The official `conds.pt` (Conditionals: {"t3": T3Cond fields, "gen": dict}) as npz arrays."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{label} is not a readable torch file ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("t3"), dict) or not isinstance(obj.get("gen"), dict):
        raise CheckpointError(f"{label}: expected a dict with 't3' and 'gen' entries (official Conditionals)")
    t3, gen = obj["t3"], obj["gen"]
    spk = _arr(t3.get("speaker_emb"), np.float32, label, "t3.speaker_emb").reshape(1, -1)
    prompt = _arr(t3.get("cond_prompt_speech_tokens"), np.int64, label, "t3.cond_prompt_speech_tokens")
    prompt = prompt.reshape(1, -1)
    emo = t3.get("emotion_adv", 0.5)
    emo = _arr(0.5 if emo is None else emo, np.float32, label, "t3.emotion_adv").reshape(-1)[:1]
    tok = _arr(gen.get("prompt_token"), np.int64, label, "gen.prompt_token").reshape(1, -1)
    feat = _arr(gen.get("prompt_feat"), np.float32, label, "gen.prompt_feat")
    feat = feat.reshape(1, -1, feat.shape[-1])
    tok_len = gen.get("prompt_token_len")
    tok_len = np.array([tok.shape[1]], np.int64) if tok_len is None else \
        _arr(tok_len, np.int64, label, "gen.prompt_token_len").reshape(-1)[:1]
    feat_len = gen.get("prompt_feat_len")
    feat_len = np.array([feat.shape[1]], np.int64) if feat_len is None else \
        _arr(feat_len, np.int64, label, "gen.prompt_feat_len").reshape(-1)[:1]
    xvec = _arr(gen.get("embedding"), np.float32, label, "gen.embedding").reshape(1, -1)
    t3c, s3 = cfg.t3, cfg.s3gen
    checks = [
        ("t3.speaker_emb size", spk.shape[1], t3c.speaker_embed_size),
        ("gen.embedding size", xvec.shape[1], s3.campplus.embedding_size),
        ("gen.prompt_feat mel bins", feat.shape[2], s3.flow.output_size),
    ]
    for what, got, want in checks:
        if got != want:
            raise CheckpointError(f"{label}: {what} is {got}, expected {want}")
    if prompt.shape[1] > t3c.prompt_len:
        raise CheckpointError(f"{label}: t3.cond_prompt_speech_tokens has {prompt.shape[1]} tokens, "
                              f"more than {t3c.prompt_len}")
    return {"t3_speaker_emb": spk, "t3_cond_prompt_speech_tokens": prompt, "t3_emotion_adv": emo,
            "gen_prompt_token": tok, "gen_prompt_token_len": tok_len, "gen_prompt_feat": feat,
            "gen_prompt_feat_len": feat_len, "gen_embedding": xvec}


def synthetic_voice(cfg: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """A made-up default voice for random-init bundles (same keys and shapes as a real one)."""
    rng = np.random.default_rng(seed + 7919)
    t3c, s3 = cfg.t3, cfg.s3gen
    spk = rng.standard_normal((1, t3c.speaker_embed_size)).astype(np.float32)
    spk /= np.linalg.norm(spk)
    n_tok = 50
    tok = rng.integers(0, s3.flow.vocab_size, (1, n_tok), dtype=np.int64)
    mel = (rng.standard_normal((1, 2 * n_tok, s3.flow.output_size)) * 1.5 - 5.0).astype(np.float32)
    return {"t3_speaker_emb": spk,
            "t3_cond_prompt_speech_tokens": rng.integers(0, t3c.start_speech_token, (1, t3c.prompt_len),
                                                         dtype=np.int64),
            "t3_emotion_adv": np.array([0.5], np.float32),
            "gen_prompt_token": tok, "gen_prompt_token_len": np.array([n_tok], np.int64),
            "gen_prompt_feat": mel, "gen_prompt_feat_len": np.array([2 * n_tok], np.int64),
            "gen_embedding": rng.standard_normal((1, s3.campplus.embedding_size)).astype(np.float32)}


# --------------------------------------------------------------------------- writing the layout


def iter_state(model: nn.Module, prefix: str = "", skip: tuple[str, ...] = ()) -> Iterator[tuple[str, torch.Tensor]]:
    for k, v in model.state_dict().items():
        if prefix + k not in skip:
            yield prefix + k, v.detach().contiguous()


def write_official_layout(source: Source, out_dir: Path, t3_wrapped: bool = False,
                          conds: bool = True) -> Path:
    """Write `source`'s weights as an official-layout checkpoint (for tests and round trips).

    `t3_wrapped` writes t3_cfg.safetensors with every key under `model.0.`.
    The S3 tokenizer's computed buffers are left out, as in the released file.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(dict(iter_state(source.load("ve"))), str(out_dir / VE_FILE))
    t3 = dict(iter_state(source.load("t3"), T3_WRAP_PREFIX if t3_wrapped else ""))
    save_file(t3, str(out_dir / T3_FILE))
    del t3
    s3: dict[str, torch.Tensor] = {}
    for comp in ("tokenizer", "speaker_encoder", "flow", "estimator", "mel2wav"):
        s3.update(iter_state(source.load(comp), s3gen_mod.section_prefix(comp), s3gen_mod.COMPUTED_BUFFERS))
    save_file(s3, str(out_dir / S3GEN_FILE))
    del s3
    source.text_tokenizer(out_dir / TOKENIZER_FILE)
    voice = source.default_voice() if conds else None
    if voice is not None:
        t3c = {"speaker_emb": torch.from_numpy(voice["t3_speaker_emb"]), "clap_emb": None,
               "cond_prompt_speech_tokens": torch.from_numpy(voice["t3_cond_prompt_speech_tokens"]),
               "cond_prompt_speech_emb": None,
               "emotion_adv": torch.from_numpy(voice["t3_emotion_adv"]).reshape(1, 1, 1)}
        gen = {"prompt_token": torch.from_numpy(voice["gen_prompt_token"]),
               "prompt_token_len": torch.from_numpy(voice["gen_prompt_token_len"]),
               "prompt_feat": torch.from_numpy(voice["gen_prompt_feat"]),
               "prompt_feat_len": None,
               "embedding": torch.from_numpy(voice["gen_embedding"])}
        torch.save({"t3": t3c, "gen": gen}, out_dir / CONDS_FILE)
    return out_dir
