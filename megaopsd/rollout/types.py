"""The records that cross the rollout boundary: sampling and engine settings, completions, rollouts.

Nothing here imports vLLM; the trainer, tests and any engine implementation share these types.
"""

from __future__ import annotations

import dataclasses
import hashlib

from megaopsd.config import WEIGHT_TRANSPORTS, EvalConfig, RolloutConfig, check_choice

GIB = 1 << 30
MIB = 1 << 20
SEED_BITS = 62  # vLLM adds the sample index (0..n-1) to a request seed; stay clear of 2**63


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingSettings:
    """How the student samples its responses.

    Attributes:
        temperature: softmax temperature; 0 is greedy.
        top_p: nucleus sampling mass (1.0 disables it).
        top_k: keep the k most likely tokens (-1 disables it).
        n: responses per prompt.
        max_new_tokens: the longest response.
        stop_token_ids: tokens that end a response (kept in ``response_ids``); ``None`` uses the
            tokenizer's EOS.
        seed: base seed. Each prompt gets its own request seed derived from (seed, step,
            global prompt index), so its samples do not depend on the batch it is in. ``None``
            samples unseeded.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    n: int = 1
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] | None = None
    seed: int | None = 0

    @classmethod
    def from_config(cls, cfg: RolloutConfig | EvalConfig, **overrides: object) -> SamplingSettings:
        """The sampling part of ``RolloutConfig`` or ``EvalConfig`` (no ``n``: 1); overrides win."""
        values = dict(
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            n=getattr(cfg, "n", 1),
            max_new_tokens=cfg.max_new_tokens,
            seed=cfg.seed,
        )
        values.update(overrides)
        return cls(**values)


def request_seed(base_seed: int, step: int, prompt_index: int) -> int:
    """A per-request seed from (base seed, step, global prompt index).

    A hash rather than ``base + index`` so that neighbouring prompts (and vLLM's ``seed + i``
    for the i-th of n samples) never share a seed, and different steps draw fresh samples.
    """
    digest = hashlib.blake2b(f"{base_seed}:{step}:{prompt_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << SEED_BITS) - 1)


_ROLLOUT = RolloutConfig()  # the engine defaults are the rollout section's, declared once there


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineSettings:
    """How to start a rollout engine and how weights reach it.

    Attributes:
        model_path: Hugging Face model directory (config, weights, tokenizer).
        tokenizer_path: tokenizer directory if not ``model_path``.
        dtype: engine parameter dtype (``float32`` for exact parity tests, ``bfloat16`` on GPU).
        max_model_len: longest prompt + response the engine accepts.
        kv_cache_bytes: KV cache size; must be set on CPU (vLLM's default takes 92% of RAM).
        enforce_eager: no CUDA graphs / compilation (fast start; required on CPU for tests).
        in_process: run the engine core in this process. Multi-rank trainers (torchrun) must use
            ``False`` (vLLM's multiprocess engine): an in-process engine hangs at init there.
        seed: the engine's global seed (requests carry their own seeds as well).
        weight_transport: ``memory`` (tensors handed over in-process), ``directory``
            (safetensors files the engine reads) or ``auto`` (memory in-process, else directory).
        weight_bucket_bytes: target bytes per weight-sync bucket (a fused module is never split).
        weight_sync_dir: where the directory transport writes; ``None`` uses /dev/shm when it
            exists, else the system temp directory.
        tensor_parallel_size: the engine's TP size (ranks of a torchrun job with
            ``external_launcher``).
        external_launcher: this process is one worker of an engine spread over the trainer's
            own processes (vLLM's ``external_launcher``: built on every rank after
            torch.distributed exists; all ranks of one engine submit the same requests).
        enable_sleep_mode: let ``sleep``/``wake_up`` free and restore GPU memory (CUDA only;
            vLLM refuses it on CPU).
        gpu_memory_utilization: the engine's share of the GPU (CUDA); ``None`` sizes the KV cache
            by ``kv_cache_bytes`` instead (CPU).
    """

    model_path: str
    tokenizer_path: str | None = None
    dtype: str = "float32"
    max_model_len: int = _ROLLOUT.max_model_len
    kv_cache_bytes: int = int(_ROLLOUT.kv_cache_gib * GIB)
    enforce_eager: bool = True
    in_process: bool = True
    seed: int = _ROLLOUT.seed
    weight_transport: str = _ROLLOUT.weight_transport
    weight_bucket_bytes: int = _ROLLOUT.weight_bucket_mb * MIB
    weight_sync_dir: str | None = _ROLLOUT.weight_sync_dir
    tensor_parallel_size: int = 1
    external_launcher: bool = False
    enable_sleep_mode: bool = False
    gpu_memory_utilization: float | None = None

    def __post_init__(self) -> None:
        check_choice("weight_transport", self.weight_transport, WEIGHT_TRANSPORTS)
        if self.weight_transport == "memory" and not self.in_process:
            raise ValueError("weight_transport=memory needs in_process=True; use directory (or auto)")
        if self.external_launcher and not self.in_process:
            raise ValueError("external_launcher engines run in the trainer's process; set in_process=True")
        if self.tensor_parallel_size > 1 and not self.external_launcher:
            raise ValueError("tensor_parallel_size > 1 needs external_launcher=True (colocated engines)")

    @classmethod
    def from_config(cls, model_path: str, cfg: RolloutConfig, **overrides: object) -> EngineSettings:
        """Engine settings from ``RolloutConfig`` (max_model_len, kv_cache_gib, seed) plus overrides."""
        values = dict(
            model_path=model_path,
            max_model_len=cfg.max_model_len,
            kv_cache_bytes=int(cfg.kv_cache_gib * GIB),
            seed=cfg.seed,
        )
        values.update(overrides)
        return cls(**values)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Completion:
    """One sampled response as the engine returns it.

    Attributes:
        response_ids: the generated token ids (a stop token, when it ended the response, included).
        engine_logprobs: the engine's log-probability of each sampled token, raw: log_softmax of
            the logits at temperature 1, before temperature/top-k/top-p processing.
        finish_reason: ``stop`` (a stop token) or ``length`` (max_new_tokens reached).
    """

    response_ids: list[int]
    engine_logprobs: list[float]
    finish_reason: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rollout:
    """One student response with everything the trainer needs to score it in both roles.

    Attributes:
        prompt_index: the prompt's position in this step's batch (global over all engines).
        sample_index: which of the ``n`` responses to that prompt (0-based).
        example_id: where the problem came from (``file:line``), for logs.
        student_prompt_ids: the exact ids vLLM generated from (built once by the prompt builder).
        teacher_prompt_ids: the teacher's prompt ids (problem + reference solution).
        response_ids: the sampled response ids (stop token included when it ended the response).
        engine_logprobs: vLLM's raw (temperature 1) log-probability of each response token.
        finish_reason: ``stop`` or ``length``.
    """

    prompt_index: int
    sample_index: int
    example_id: str
    student_prompt_ids: list[int]
    teacher_prompt_ids: list[int]
    response_ids: list[int]
    engine_logprobs: list[float]
    finish_reason: str
