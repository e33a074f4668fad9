"""HiFT vocoder of S3Gen (`mel2wav.*` in s3gen.safetensors): f0 predictor + NSF/iSTFT decoder.

Two contract graphs come out of this module (see docs/architecture.md, "the graph contract"):

* `hift_f0`:      mel [B,80,T] -> f0 [B,T]
* `hift_decoder`: mel [B,80,T], sine_waves [B,480*T,9] -> magnitude [B,9,F], phase [B,9,F]
                  with F = 120*T + 1 (one STFT frame per hop of 4 samples, centred).

What stays outside the graphs (random or cheap DSP, done by the numpy runtime) is
given here as torch reference code: `sine_generator_torch` (harmonic sine source,
random), `istft_torch` (magnitude clip, inverse STFT, clamp), `fade_in_torch`, and
`vocode_torch`, which chains everything the way the released model does.

Inside `hift_decoder` the STFT of the excitation is a strided conv1d with a fixed
windowed DFT basis (torch.stft does not export); it computes the same transform
as torch.stft(center=True, pad_mode="reflect", onesided, unnormalized, periodic hann).
The window and the basis come from `actors.dsp`, as in the numpy runtime.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from actors.chatterbox.vocoder import draw_sine_randomness  # one draw order: the runtime's
from actors.dsp import dft_basis, hann
from export.chatterbox.spec import GraphSpec, Inputs, Tolerance


# --------------------------------------------------------------------------- config

@dataclass
class HiFTConfig:
    """Sizes of the HiFT vocoder; defaults are the released Chatterbox model."""

    in_channels: int = 80
    base_channels: int = 512
    upsample_rates: list[int] = field(default_factory=lambda: [8, 5, 3])
    upsample_kernel_sizes: list[int] = field(default_factory=lambda: [16, 11, 7])
    resblock_kernel_sizes: list[int] = field(default_factory=lambda: [3, 7, 11])
    resblock_dilation_sizes: list[list[int]] = field(
        default_factory=lambda: [[1, 3, 5], [1, 3, 5], [1, 3, 5]])
    source_resblock_kernel_sizes: list[int] = field(default_factory=lambda: [7, 7, 11])
    source_resblock_dilation_sizes: list[list[int]] = field(
        default_factory=lambda: [[1, 3, 5], [1, 3, 5], [1, 3, 5]])
    n_fft: int = 16
    hop_length: int = 4
    nb_harmonics: int = 8
    sampling_rate: int = 24000
    nsf_alpha: float = 0.1            # sine amplitude
    nsf_sigma: float = 0.003          # noise std in voiced regions
    nsf_voiced_threshold: float = 10.0
    lrelu_slope: float = 0.1          # between upsampling stages (conv_post uses 0.01)
    audio_limit: float = 0.99
    magnitude_max: float = 100.0      # clip applied to the magnitude before the iSTFT
    f0_channels: int = 512
    f0_conv_layers: int = 5

    def __post_init__(self) -> None:
        n_up = len(self.upsample_rates)
        if len(self.upsample_kernel_sizes) != n_up:
            raise ValueError("hift: upsample_rates and upsample_kernel_sizes differ in length")
        if len(self.source_resblock_kernel_sizes) != n_up or len(self.source_resblock_dilation_sizes) != n_up:
            raise ValueError("hift: need one source resblock per upsampling stage")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
            raise ValueError("hift: resblock kernel and dilation lists differ in length")
        if self.base_channels % (2 ** n_up):
            raise ValueError(f"hift: base_channels must be divisible by {2 ** n_up}")
        for u, k in zip(self.upsample_rates, self.upsample_kernel_sizes):
            if (k - u) % 2:
                raise ValueError(f"hift: upsample kernel {k} - rate {u} must be even (exact x{u} length)")
        if self.n_fft % 2 or self.n_fft % self.hop_length:
            raise ValueError("hift: n_fft must be even and a multiple of hop_length")

    @property
    def freq_bins(self) -> int:
        return self.n_fft // 2 + 1

    @property
    def samples_per_frame(self) -> int:
        """Audio samples per mel frame (480 for the released model)."""
        return int(np.prod(self.upsample_rates)) * self.hop_length

    @property
    def frames_per_mel_frame(self) -> int:
        """STFT frames per mel frame; a row of T mel frames has T*this + 1 STFT frames."""
        return int(np.prod(self.upsample_rates))

    def stft_frames(self, mel_frames: int) -> int:
        return self.frames_per_mel_frame * mel_frames + 1


# --------------------------------------------------------------------------- modules

class Snake(nn.Module):
    """x + sin^2(alpha x) / alpha with a learned per-channel alpha (linear scale)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha.unsqueeze(0).unsqueeze(-1)
        return x + (1.0 / (a + 1e-9)) * torch.pow(torch.sin(x * a), 2)


def _same_pad(kernel: int, dilation: int = 1) -> int:
    return (kernel - 1) * dilation // 2


class ResBlock(nn.Module):
    """Snake -> dilated conv -> Snake -> conv, residual, once per dilation."""

    def __init__(self, channels: int, kernel: int, dilations: list[int]):
        super().__init__()
        self.convs1 = nn.ModuleList(
            weight_norm(nn.Conv1d(channels, channels, kernel, dilation=d, padding=_same_pad(kernel, d)))
            for d in dilations)
        self.convs2 = nn.ModuleList(
            weight_norm(nn.Conv1d(channels, channels, kernel, padding=_same_pad(kernel)))
            for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for act1, conv1, act2, conv2 in zip(self.activations1, self.convs1,
                                            self.activations2, self.convs2):
            x = x + conv2(act2(conv1(act1(x))))
        return x


class ConvRNNF0Predictor(nn.Module):
    """Stack of k=3 convs with ELU on the mel, then a per-frame linear head; |.| is f0 in Hz."""

    def __init__(self, in_channels: int = 80, channels: int = 512, layers: int = 5):
        super().__init__()
        mods: list[nn.Module] = []
        for i in range(layers):
            mods.append(weight_norm(nn.Conv1d(in_channels if i == 0 else channels, channels, 3, padding=1)))
            mods.append(nn.ELU())
        self.condnet = nn.Sequential(*mods)
        self.classifier = nn.Linear(channels, 1)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        h = self.condnet(mel).transpose(1, 2)
        return torch.abs(self.classifier(h).squeeze(-1))


class SourceMerge(nn.Module):
    """Holds `l_linear` (harmonics -> one excitation channel), named like the official m_source."""

    def __init__(self, harmonics: int):
        super().__init__()
        self.l_linear = nn.Linear(harmonics + 1, 1)

    def forward(self, sine_waves: torch.Tensor) -> torch.Tensor:
        """[B, N, H+1] -> excitation [B, N]."""
        return torch.tanh(self.l_linear(sine_waves)).squeeze(-1)


def stft_conv(x: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """torch.stft(x, n_fft, hop, n_fft, hann, center=True, reflect) as [B, 2*bins, frames] (real; imag).

    A strided conv1d with a constant basis, so it exports to ONNX with dynamic length.
    """
    with warnings.catch_warnings():  # a constant in the trace is what we want here
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        basis = torch.from_numpy(dft_basis(n_fft)).to(device=x.device, dtype=x.dtype)
    padded = F.pad(x.unsqueeze(1), (n_fft // 2, n_fft // 2), mode="reflect")
    return F.conv1d(padded, basis, stride=hop)


def stft_torch(x: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """Reference: the official torch.stft call, as [B, 2*bins, frames] (real; imag)."""
    window = torch.from_numpy(hann(n_fft)).to(x.device)
    spec = torch.view_as_real(torch.stft(x, n_fft, hop, n_fft, window=window, return_complex=True))
    return torch.cat([spec[..., 0], spec[..., 1]], dim=1)


class HiFTGenerator(nn.Module):
    """Our HiFT (NSF + iSTFTNet) generator; state dict = official `mel2wav.*` names.

    `forward(mel, sine_waves)` is the decoder graph: (magnitude, phase).
    `f0_predictor(mel)` is the f0 graph.
    """

    def __init__(self, cfg: HiFTConfig | None = None):
        super().__init__()
        cfg = cfg or HiFTConfig()
        self.cfg = cfg
        base, rates = cfg.base_channels, cfg.upsample_rates
        n_up = len(rates)
        stft_ch = cfg.n_fft + 2

        self.m_source = SourceMerge(cfg.nb_harmonics)
        self.conv_pre = weight_norm(nn.Conv1d(cfg.in_channels, base, 7, padding=3))
        self.ups = nn.ModuleList(
            weight_norm(nn.ConvTranspose1d(base // 2 ** i, base // 2 ** (i + 1), k, u, padding=(k - u) // 2))
            for i, (u, k) in enumerate(zip(rates, cfg.upsample_kernel_sizes)))

        # The excitation's STFT enters every stage, brought down to that stage's rate.
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i in range(n_up):
            ch = base // 2 ** (i + 1)
            stride = int(np.prod(rates[i + 1:])) if i + 1 < n_up else 1
            if stride == 1:
                self.source_downs.append(nn.Conv1d(stft_ch, ch, 1))
            else:
                self.source_downs.append(nn.Conv1d(stft_ch, ch, 2 * stride, stride, padding=stride // 2))
            self.source_resblocks.append(ResBlock(ch, cfg.source_resblock_kernel_sizes[i],
                                                  cfg.source_resblock_dilation_sizes[i]))

        self.resblocks = nn.ModuleList(
            ResBlock(base // 2 ** (i + 1), k, d)
            for i in range(n_up)
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes))
        self.conv_post = weight_norm(nn.Conv1d(base // 2 ** n_up, stft_ch, 7, padding=3))
        self.f0_predictor = ConvRNNF0Predictor(cfg.in_channels, cfg.f0_channels, cfg.f0_conv_layers)

    def source_spectrum(self, sine_waves: torch.Tensor, stft: str = "conv") -> torch.Tensor:
        """sine_waves [B, N, H+1] -> STFT of tanh(l_linear(.)) as [B, n_fft+2, N/hop + 1]."""
        excitation = self.m_source(sine_waves)
        if stft == "conv":
            return stft_conv(excitation, self.cfg.n_fft, self.cfg.hop_length)
        if stft == "torch":
            return stft_torch(excitation, self.cfg.n_fft, self.cfg.hop_length)
        raise ValueError(f"unknown stft implementation {stft!r}")

    def decode_spectrum(self, mel: torch.Tensor, sine_waves: torch.Tensor,
                        stft: str = "conv") -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        s = self.source_spectrum(sine_waves, stft)
        n_kernels = len(cfg.resblock_kernel_sizes)
        x = self.conv_pre(mel)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, cfg.lrelu_slope))
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")
            x = x + self.source_resblocks[i](self.source_downs[i](s))
            acc = self.resblocks[i * n_kernels](x)
            for j in range(1, n_kernels):
                acc = acc + self.resblocks[i * n_kernels + j](x)
            x = acc / n_kernels
        x = self.conv_post(F.leaky_relu(x))  # default slope 0.01 here, as released
        bins = cfg.freq_bins
        magnitude = torch.exp(x[:, :bins, :])
        phase = torch.sin(x[:, bins:, :])
        return magnitude, phase

    def forward(self, mel: torch.Tensor, sine_waves: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decode_spectrum(mel, sine_waves)


def build_hift(cfg: HiFTConfig | None = None, seed: int | None = None) -> HiFTGenerator:
    """A HiFTGenerator in eval mode (load released weights into it with strict=True).

    With `seed`: a reproducible random init for test bundles.  On top of torch's default
    init, the Snake alphas are drawn from U(0.5, 2) and the f0 head's bias is set to
    150 Hz, so that f0 lands in the voiced range and the sine path is exercised.
    """
    if seed is None:
        return HiFTGenerator(cfg).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HiFTGenerator(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".alpha"):
                    p.uniform_(0.5, 2.0)
            model.f0_predictor.classifier.bias.fill_(150.0)
    return model.eval()


# --------------------------------------------------------------------------- outside the graphs (torch references)

def sine_generator_torch(f0: torch.Tensor, cfg: HiFTConfig | None = None, *,
                         rng: np.random.Generator | None = None,
                         phases: torch.Tensor | np.ndarray | None = None,
                         noise: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
    """f0 [B, T] (Hz, per mel frame) -> sine_waves [B, T*samples_per_frame, H+1] (float32).

    Same arithmetic as the released SineGen: f0 repeated per sample (nearest upsampling),
    harmonic k (1-based) advances k*f0/sr cycles per sample, phase = 2*pi*(cumsum mod 1)
    + a random initial phase (0 for the fundamental), amplitude nsf_alpha; unvoiced
    samples (f0 <= threshold) keep only noise of std nsf_alpha/3, voiced ones add noise
    of std nsf_sigma.  Randomness: `phases` [B, H+1] and `noise` [B, N, H+1] if given,
    else drawn from `rng` by `draw_sine_randomness`.
    """
    cfg = cfg or HiFTConfig()
    f0 = torch.as_tensor(f0, dtype=torch.float32)
    batch, frames = f0.shape
    n_harm = cfg.nb_harmonics + 1
    samples = frames * cfg.samples_per_frame
    if phases is None or noise is None:
        drawn_p, drawn_n = draw_sine_randomness(rng if rng is not None else np.random.default_rng(),
                                                batch, samples, cfg.nb_harmonics)
        phases = drawn_p if phases is None else phases
        noise = drawn_n if noise is None else noise
    phases = torch.as_tensor(phases, dtype=torch.float32).reshape(batch, n_harm, 1)
    noise = torch.as_tensor(noise, dtype=torch.float32)
    if noise.shape != (batch, samples, n_harm):
        raise ValueError(f"noise shape {tuple(noise.shape)} != {(batch, samples, n_harm)}")

    f0_up = torch.repeat_interleave(f0, cfg.samples_per_frame, dim=-1).unsqueeze(1)  # [B, 1, N]
    cycles = torch.cat([f0_up * (k + 1) / cfg.sampling_rate for k in range(n_harm)], dim=1)
    theta = 2 * np.pi * (torch.cumsum(cycles, dim=-1) % 1)
    sines = cfg.nsf_alpha * torch.sin(theta + phases)
    uv = (f0_up > cfg.nsf_voiced_threshold).to(torch.float32)
    noise_amp = uv * cfg.nsf_sigma + (1 - uv) * cfg.nsf_alpha / 3
    out = sines * uv + noise_amp * noise.transpose(1, 2)
    return out.transpose(1, 2).contiguous()


def istft_torch(magnitude: torch.Tensor, phase: torch.Tensor, cfg: HiFTConfig | None = None) -> torch.Tensor:
    """magnitude, phase [B, bins, F] -> audio [B, hop*(F-1)]: clip |.| <= 100, iSTFT (hann, centred), clamp."""
    cfg = cfg or HiFTConfig()
    magnitude = torch.clip(torch.as_tensor(magnitude), max=cfg.magnitude_max)
    phase = torch.as_tensor(phase)
    spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
    window = torch.from_numpy(hann(cfg.n_fft)).to(magnitude.device)
    audio = torch.istft(spec, cfg.n_fft, cfg.hop_length, cfg.n_fft, window=window)
    return torch.clamp(audio, -cfg.audio_limit, cfg.audio_limit)


def fade_in_torch(audio: torch.Tensor, sampling_rate: int = 24000) -> torch.Tensor:
    """S3Gen's start trim: 20 ms of silence, then a 20 ms raised-cosine fade-in (returns a copy)."""
    n = sampling_rate // 50
    fade = torch.zeros(2 * n)
    fade[n:] = (torch.cos(torch.linspace(torch.pi, 0, n)) + 1) / 2
    out = audio.clone()
    m = min(out.shape[-1], 2 * n)
    out[..., :m] = out[..., :m] * fade[:m].to(out.dtype)
    return out


@torch.no_grad()
def vocode_torch(model: HiFTGenerator, mel: torch.Tensor, rng: np.random.Generator | None = None, *,
                 phases=None, noise=None, fade_in: bool = False, stft: str = "torch") -> torch.Tensor:
    """mel [B, 80, T] -> audio [B, T*samples_per_frame], composed like HiFTGenerator.inference.

    f0 predictor -> sine generator -> l_linear+tanh -> STFT -> decoder -> magnitude/phase ->
    iSTFT -> clamp (and S3Gen's fade-in with `fade_in`).  `stft="torch"` uses torch.stft,
    as the released code does; "conv" the exported DFT conv.
    """
    cfg = model.cfg
    f0 = model.f0_predictor(mel)
    sine = sine_generator_torch(f0, cfg, rng=rng, phases=phases, noise=noise)
    magnitude, phase = model.decode_spectrum(mel, sine, stft=stft)
    audio = istft_torch(magnitude, phase, cfg)
    return fade_in_torch(audio, cfg.sampling_rate) if fade_in else audio


# --------------------------------------------------------------------------- receptive-field margins

def _conv_taint(s: int, kernel: int, stride: int = 1, pad: int = 0, dilation: int = 1) -> int:
    # first output whose window reaches input index >= s
    return max(0, -(-(s + pad - (kernel - 1) * dilation) // stride))


def _resblock_taint(s: int, kernel: int, dilations: list[int]) -> int:
    for d in dilations:
        s = min(s, _conv_taint(_conv_taint(s, kernel, pad=_same_pad(kernel, d), dilation=d),
                               kernel, pad=_same_pad(kernel)))
    return s


def _taint_starts(cfg: HiFTConfig, frames: int) -> tuple[int, int]:
    """(first tainted f0 frame, first tainted decoder output frame) of a row of `frames`
    mel frames when everything from index `frames` (mel) / `frames*480` (samples) on differs."""
    s = frames
    for _ in range(cfg.f0_conv_layers):
        s = _conv_taint(s, 3, pad=1)
    f0_start = s

    src = frames * cfg.samples_per_frame + cfg.n_fft // 2      # after the centring reflect pad
    src = _conv_taint(src, cfg.n_fft, stride=cfg.hop_length)   # STFT frames
    x = _conv_taint(frames, 7, pad=3)
    n_up = len(cfg.upsample_rates)
    for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)):
        x = max(0, x * u - (k - u) // 2)
        if i == n_up - 1:
            x += 1                                             # reflection pad (1, 0)
        stride = int(np.prod(cfg.upsample_rates[i + 1:])) if i + 1 < n_up else 1
        si = src if stride == 1 else _conv_taint(src, 2 * stride, stride, stride // 2)
        si = _resblock_taint(si, cfg.source_resblock_kernel_sizes[i], cfg.source_resblock_dilation_sizes[i])
        x = min(x, si)
        x = min(_resblock_taint(x, k_, d_) for k_, d_ in zip(cfg.resblock_kernel_sizes,
                                                             cfg.resblock_dilation_sizes))
    x = _conv_taint(x, 7, pad=3)
    return f0_start, x


def tail_margins(cfg: HiFTConfig) -> dict[str, int]:
    """Trailing output elements (last axis) of a right-padded row that can see the padding.

    f0: in mel frames; magnitude/phase: in STFT frames.  Everything before them is
    independent of what the padding holds.
    """
    out = []
    for frames in (64, 97):
        f0_start, dec_start = _taint_starts(cfg, frames)
        out.append((frames - f0_start, cfg.stft_frames(frames) - dec_start))
    if out[0] != out[1]:
        raise AssertionError(f"receptive-field margin depends on length: {out}")
    f0_m, dec_m = out[0]
    return {"f0": f0_m, "magnitude": dec_m, "phase": dec_m}


# --------------------------------------------------------------------------- graphs

class HiftF0Graph(nn.Module):
    def __init__(self, model: HiFTGenerator):
        super().__init__()
        self.model = model

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.model.f0_predictor(mel)


class HiftDecoderGraph(nn.Module):
    def __init__(self, model: HiFTGenerator):
        super().__init__()
        self.model = model

    def forward(self, mel: torch.Tensor, sine_waves: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.decode_spectrum(mel, sine_waves, stft="conv")


def _mel_batch(cfg: HiFTConfig, lengths: list[int], rng: np.random.Generator) -> np.ndarray:
    # Padding is filled with values unlike the rows so a too-small margin shows up.
    mel = (rng.standard_normal((len(lengths), cfg.in_channels, max(lengths))) * 2.0 + 3.0).astype(np.float32)
    for i, n in enumerate(lengths):
        mel[i, :, :n] = rng.standard_normal((cfg.in_channels, n)).astype(np.float32) - 1.0
    return mel


def graph_specs(model: HiFTGenerator, cfg: HiFTConfig | None = None, *,
                trace_lengths: list[int] | None = None,
                verify_lengths: list[int] | None = None) -> list[GraphSpec]:
    """GraphSpecs of `hift_f0` and `hift_decoder` for `model` (lengths in mel frames)."""
    cfg = cfg or model.cfg
    model.eval()
    margins = tail_margins(cfg)
    trace_lengths = trace_lengths or [6, 4]
    verify_lengths = verify_lengths or [24, 30, 18]
    spf = cfg.samples_per_frame
    padded = [n for n in verify_lengths if n < max(verify_lengths)]
    if not padded or cfg.stft_frames(min(padded)) <= margins["magnitude"] or min(padded) <= margins["f0"]:
        raise ValueError(f"hift verify_lengths {verify_lengths} leave nothing to compare on padded rows "
                         f"(tail margins {margins}; stft frames = {cfg.frames_per_mel_frame}*T+1)")

    def f0_batch(lengths: list[int], rng: np.random.Generator) -> Inputs:
        return {"mel": _mel_batch(cfg, lengths, rng)}

    def f0_row(batch: Inputs, i: int, lengths: list[int]) -> Inputs:
        return {"mel": np.ascontiguousarray(batch["mel"][i:i + 1, :, :lengths[i]])}

    def dec_batch(lengths: list[int], rng: np.random.Generator) -> Inputs:
        mel = _mel_batch(cfg, lengths, rng)
        sine = (rng.standard_normal((len(lengths), max(lengths) * spf, cfg.nb_harmonics + 1)) * 0.3
                ).astype(np.float32)
        for i, n in enumerate(lengths):
            f0 = rng.uniform(60.0, 400.0, size=(1, n)) * (rng.random((1, n)) > 0.3)
            sine[i, :n * spf] = sine_generator_torch(torch.from_numpy(f0.astype(np.float32)), cfg,
                                                     rng=rng)[0].numpy()
        return {"mel": mel, "sine_waves": sine}

    def dec_row(batch: Inputs, i: int, lengths: list[int]) -> Inputs:
        n = lengths[i]
        return {"mel": np.ascontiguousarray(batch["mel"][i:i + 1, :, :n]),
                "sine_waves": np.ascontiguousarray(batch["sine_waves"][i:i + 1, :n * spf])}

    f0_spec = GraphSpec(
        name="hift_f0", module=HiftF0Graph(model).eval(),
        input_names=["mel"], output_names=["f0"],
        dynamic_axes={"mel": {0: "batch", 2: "frames"}, "f0": {0: "batch", 1: "frames"}},
        make_batch=f0_batch, take_row=f0_row,
        trace_lengths=list(trace_lengths), verify_lengths=list(verify_lengths),
        tolerance=Tolerance(atol=1e-4, rtol=1e-4),
        row_tail_margin={"f0": margins["f0"]},
    )
    dec_spec = GraphSpec(
        name="hift_decoder", module=HiftDecoderGraph(model).eval(),
        input_names=["mel", "sine_waves"], output_names=["magnitude", "phase"],
        dynamic_axes={"mel": {0: "batch", 2: "frames"}, "sine_waves": {0: "batch", 1: "samples"},
                      "magnitude": {0: "batch", 2: "stft_frames"}, "phase": {0: "batch", 2: "stft_frames"}},
        make_batch=dec_batch, take_row=dec_row,
        trace_lengths=list(trace_lengths), verify_lengths=list(verify_lengths),
        # magnitude = exp(.) so its error scales with its size: relative part needed.
        tolerance=Tolerance(atol=1e-4, rtol=1e-3),
        row_tail_margin={"magnitude": margins["magnitude"], "phase": margins["phase"]},
    )
    return [f0_spec, dec_spec]
