"""Teacher modes: which weights score the teacher stream.

- ``current``: the student's live weights, run under no_grad (OPSD's default).
- ``fixed``: a frozen copy of the initial weights (the paper's recommended setting).
- ``ema``: an exponential moving average of the student, updated after every optimizer
  step as ``ema = d * ema + (1 - d) * student`` in float32.

A teacher never gets an optimizer, gradients or a DDP wrapper: copies are plain GPTModel
chunks with ``requires_grad=False``. The training loop only calls ``chunk(i)`` and
``after_optimizer_step()``; the mode is chosen once, by ``make_teacher``.

With LoRA (``lora.rank > 0``) no copy is made: ``fixed`` is the student's own modules with the
adapters switched off (the base weights never train), ``ema`` the student's modules with the
adapters replaced by their float32 EMA (shadow tensors; the base is shared).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from megaopsd.config import TeacherConfig
from megaopsd.models.builder import unwrap_chunk
from megaopsd.models.lora import adapter_mode, adapters_of
from megaopsd.runtime.rng import capture_rng_state, restore_rng_state


class Teacher:
    """Base: the teacher is the student itself (``current`` mode)."""

    mode = "current"
    holds_weights = False  # True: a copy of the weights that checkpoints save under "teacher."

    def __init__(self, student_chunks: Sequence[torch.nn.Module]):
        self._student = [unwrap_chunk(c) for c in student_chunks]

    def chunk(self, index: int) -> torch.nn.Module:
        """The module that runs the teacher stream for virtual-pipeline chunk ``index``."""
        return self._student[index]

    def after_optimizer_step(self) -> None:
        """Called once after every successful optimizer step."""


class FrozenTeacher(Teacher):
    """A copy of the student's weights at construction time, never updated."""

    mode = "fixed"
    holds_weights = True

    def __init__(
        self, student_chunks: Sequence[torch.nn.Module], build_chunks: Callable[[], list[torch.nn.Module]]
    ):
        super().__init__(student_chunks)
        self._copies = _frozen_copies(self._student, build_chunks)

    def chunk(self, index: int) -> torch.nn.Module:
        return self._copies[index]

    @torch.no_grad()
    def load_chunk_state(
        self, index: int, state: dict[str, torch.Tensor], *, prefix: str = "teacher."
    ) -> None:
        """Load weights saved under ``prefix`` (see ``megaopsd.checkpoint``) into copy ``index``."""
        stripped = {k.removeprefix(prefix): v for k, v in state.items()}
        self._copies[index].load_state_dict(stripped, strict=True)


class EmaTeacher(FrozenTeacher):
    """An EMA of the student; the average is kept in float32 whatever the model dtype.

    On float32 models the average lives in the teacher module itself. Otherwise it lives in a
    float32 shadow per parameter, cast into the module after each update; checkpoints save the
    shadow (``shadow_sharded_state``) because the module's bfloat16 copy cannot rebuild it
    exactly, and a resumed run would drift from the uninterrupted one.
    """

    mode = "ema"
    SHADOW_PREFIX = "teacher_ema_fp32"  # checkpoint key prefix of the shadow tensors

    def __init__(self, student_chunks, build_chunks, *, decay: float):
        super().__init__(student_chunks, build_chunks)
        self.decay = decay
        self._pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._shadows: list[dict[str, torch.Tensor]] = []  # per chunk: parameter name -> float32 shadow
        for teacher, student in zip(self._copies, self._student, strict=True):
            student_params = dict(student.named_parameters())
            shadows = {}
            for name, param in teacher.named_parameters():
                data = param.data  # one object: ``param.data`` makes a new one on every access
                average = data if data.dtype == torch.float32 else data.float()
                if average is not data:
                    shadows[name] = average
                self._pairs.append((average, data, student_params[name]))
            self._shadows.append(shadows)

    @property
    def has_shadow(self) -> bool:
        """True when some average lives outside the module (non-float32 models)."""
        return any(self._shadows)

    def shadows(self, index: int) -> dict[str, torch.Tensor]:
        """Chunk ``index``'s float32 shadows by parameter name (empty on float32 models)."""
        return dict(self._shadows[index])

    def shadow_sharded_state(self, index: int, *, prefix: str = "teacher.") -> dict:
        """Chunk ``index``'s float32 shadows, sharded like the teacher's own parameters."""
        from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

        if not self._shadows[index]:
            return {}
        model_state = self._copies[index].sharded_state_dict(prefix=prefix)
        return {
            name: make_sharded_optimizer_tensor(model_state[prefix + name], shadow, prefix=self.SHADOW_PREFIX)
            for name, shadow in self._shadows[index].items()
        }

    @torch.no_grad()
    def load_chunk_state(
        self,
        index: int,
        state: dict[str, torch.Tensor],
        *,
        prefix: str = "teacher.",
        shadow: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Load the module weights and, when given, the float32 shadows saved with them.

        Without ``shadow`` (a checkpoint from a float32 run or an older one) the shadows are
        rebuilt from the module weights, which loses the bits below their precision.
        """
        super().load_chunk_state(index, state, prefix=prefix)
        for name, average in self._shadows[index].items():
            module_param = dict(self._copies[index].named_parameters())[name]
            average.copy_(shadow[name] if shadow is not None else module_param)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        for average, module_param, student_param in self._pairs:
            average.mul_(self.decay).add_(student_param.detach().float(), alpha=1.0 - self.decay)
            if module_param is not average:
                module_param.copy_(average)


def _frozen_copies(student: list[torch.nn.Module], build_chunks: Callable[[], list[torch.nn.Module]]):
    """Build fresh chunks (without touching the RNG streams) and load the student's weights.

    ``copy.deepcopy`` of a GPTModel fails on its process groups; a second model built from
    the same spec has the same keys. Building consumes random numbers (weight init), so the
    CPU/CUDA and megatron tracker states are restored afterwards: adding a teacher must not
    change the student's run.
    """

    state = capture_rng_state()
    try:
        copies = build_chunks()
    finally:
        restore_rng_state(state)
    for copy, source in zip(copies, student, strict=True):
        copy.load_state_dict(source.state_dict(), strict=True)
        copy.requires_grad_(False)
        copy.eval()
    return copies


class AdapterView:
    """The student's chunk run with its LoRA adapters in ``mode`` ("off" or "shadow"): no copy.

    Everything but the call (``set_input_tensor``, ``parameters``, attribute writes) is the
    student chunk's.
    """

    def __init__(self, module: torch.nn.Module, mode: str):
        self._module, self._mode = module, mode
        self._adapters = adapters_of([module])

    def __call__(self, *args, **kwargs):
        with adapter_mode(self._adapters, self._mode):
            return self._module(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._module, name)

    def __setattr__(self, name: str, value) -> None:
        # Flags set on the chunk (e.g. ``post_process`` by models.forward.decoder_hidden) must
        # reach the module itself.
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._module, name, value)


class AdaptersOffTeacher(Teacher):
    """LoRA's fixed teacher: the student's modules with the adapters bypassed (the frozen base)."""

    mode = "fixed"

    def __init__(self, student_chunks: Sequence[torch.nn.Module]):
        super().__init__(student_chunks)
        self._views = [AdapterView(module, "off") for module in self._student]

    def chunk(self, index: int) -> AdapterView:
        return self._views[index]


class AdapterEmaTeacher(Teacher):
    """LoRA's EMA teacher: the base is shared, the adapters are float32 averages of the student's."""

    mode = "ema"

    def __init__(self, student_chunks: Sequence[torch.nn.Module], *, decay: float):
        super().__init__(student_chunks)
        self.decay = decay
        self._views = [AdapterView(module, "shadow") for module in self._student]
        # (float32 average, the module-dtype tensor the forward uses, the student parameter)
        self._pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.averages: dict[str, torch.Tensor] = {}  # "<layer>.<A|B>.<member>" -> float32 average
        for adapters in adapters_of(self._student):
            for kind, params in (("A", adapters.A), ("B", adapters.B)):
                for member, param in params.items():
                    average = param.detach().float().clone()
                    used = average if param.dtype == torch.float32 else average.to(param.dtype)
                    adapters.shadow[f"{kind}.{member}"] = used
                    self.averages[f"{adapters.layer}.{kind}.{member}"] = average
                    self._pairs.append((average, used, param))

    def chunk(self, index: int) -> AdapterView:
        return self._views[index]

    def sharded_averages(self) -> dict:
        """The averages as megatron sharded tensors (TP-split like the adapters), for checkpoints."""
        from megatron.core.transformer.utils import (
            make_sharded_tensor_for_checkpoint,
            make_tp_sharded_tensor_for_checkpoint,
        )

        out = {}
        for adapters in adapters_of(self._student):
            row = adapters.kind == "row"
            for kind in ("A", "B"):
                for member in adapters.members:
                    name = f"{adapters.layer}.{kind}.{member}"
                    key = f"teacher_lora.{name}"
                    if (kind == "A") == row:
                        out[name] = make_tp_sharded_tensor_for_checkpoint(
                            self.averages[name], key, 1 if row else 0
                        )
                    else:
                        out[name] = make_sharded_tensor_for_checkpoint(self.averages[name], key)
        return out

    @torch.no_grad()
    def load_averages(self, averages: dict[str, torch.Tensor]) -> None:
        """Restore the averages saved from ``averages`` (a checkpoint)."""
        for name, average in self.averages.items():
            average.copy_(averages[name])
        for average, used, _ in self._pairs:
            if used is not average:
                used.copy_(average)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        for average, used, student_param in self._pairs:
            average.mul_(self.decay).add_(student_param.detach().float(), alpha=1.0 - self.decay)
            if used is not average:
                used.copy_(average)


def make_teacher(
    cfg: TeacherConfig,
    student_chunks: Sequence[torch.nn.Module],
    build_chunks: Callable[[], list[torch.nn.Module]],
    *,
    lora: bool = False,
) -> Teacher:
    """The teacher for ``cfg.mode``; ``build_chunks`` makes unwrapped chunks like the student's.

    With ``lora`` (adapters already attached to ``student_chunks``) no weights are copied.
    """
    if cfg.mode == "current":
        return Teacher(student_chunks)
    if lora and cfg.mode == "fixed":
        return AdaptersOffTeacher(student_chunks)
    if lora and cfg.mode == "ema":
        return AdapterEmaTeacher(student_chunks, decay=cfg.ema_decay)
    if cfg.mode == "fixed":
        return FrozenTeacher(student_chunks, build_chunks)
    if cfg.mode == "ema":
        return EmaTeacher(student_chunks, build_chunks, decay=cfg.ema_decay)
    raise ValueError(f"teacher.mode={cfg.mode!r} is unknown; use current, fixed or ema")
