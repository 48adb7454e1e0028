"""LoRA layers on nn.Linear / GPT-2 Conv1D and nn.Embedding, and what every LoRA layer shares.

h = W x + s (B A x + c) with s = alpha / r (alpha / sqrt(r) under rsLoRA) and c B's bias (``lora_bias=True``, else
0); merge is W += s B A, b += s c, and unmerge its exact inverse W -= s B A, b -= s c.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.layer import Routing, WrapsInPlace, registrations, weights_fixed
from peftkit.core.targeting import is_conv1d_gpt2
from peftkit.errors import ConfigError, MergeError
from peftkit.methods.lora import autograd, dora, inits
from peftkit.methods.lora.config import LoraConfig
from peftkit.methods.lora.rows import FactorStack, gathered_delta, grouped_delta


class LoraLayer(WrapsInPlace):
    """What every LoRA layer shares: ranks, scalings, merge as W ± ΔW (and b ± s c), and per-row routing.

    Subclasses create the factors (``create``), give them as matrices (``factors``: A (r, in), B (out, r))
    and turn them into a weight-shaped delta (``delta_weight``). Attributes the layer does not have itself
    (``in_features``, ``out_features``, ``kernel_size``...) are read from the wrapped module, as third-party code
    expects of peft's layers.
    """

    adapter_other_names = ("lora_dropout", "scaling", "r", "_dora_cache", "_dora_merged")
    supports_lora_bias: ClassVar[bool] = True  # whether B can carry a bias (``lora_bias=True``)
    # how DoRA (methods/lora/dora.py) reads the weight as (out, in): "linear", "embedding", "conv"; None: no DoRA
    dora_layout: ClassVar[str | None] = None
    supports_weight_inits: ClassVar[bool] = False  # init_lora_weights="pissa" / "olora" (methods/lora/inits.py)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.r: dict[str, int] = {}
        self._stack_cache: tuple[Any, FactorStack, Any, list[int]] | None = None
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA's m per adapter (one per output row)
        self._dora_cache: dict[Any, tuple] = {}  # adapter -> (versions, ||W + s B A||_c); (adapter, "f") -> m / norm
        self._dora_merged: dict[str, torch.Tensor] = {}  # merged DoRA adapter -> the f it was merged with

    def update_layer(self, adapter_name: str, config: LoraConfig, module_name: str) -> None:
        if config.use_dora:
            dora.check_supported(self, module_name)
        if inits.is_weight_init(config.init_lora_weights) and not self.supports_weight_inits:
            raise ConfigError(
                f"init_lora_weights={config.init_lora_weights!r} is not supported on {module_name!r} "
                f"({type(self.get_base_layer()).__name__}); it decomposes a Linear / GPT-2 Conv1D weight. Exclude the "
                "module or use init_lora_weights=True."
            )
        r, alpha = config.rank_for(module_name), config.alpha_for(module_name)
        self.r[adapter_name] = r
        self.scaling[adapter_name] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        p = config.lora_dropout
        self.lora_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()
        if config.lora_bias and not self.supports_lora_bias:
            raise ConfigError(
                f"lora_bias=True is not supported on {module_name!r} ({type(self).__name__}); as in peft, B carries a "
                "bias only on Linear, GPT-2 Conv1D and convolution layers. Set lora_bias=False or exclude the module."
            )
        weight = self.reference_weight()
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        with torch.device("meta"):  # no throw-away init: allocate once on the base's device, initialise once
            self.create(adapter_name, r, config.lora_bias)
        for attr in self.adapter_param_names:
            holder = getattr(self, attr)
            if adapter_name not in holder:  # DoRA's magnitude: created below, for DoRA adapters only
                continue
            if isinstance(holder[adapter_name], nn.Parameter):
                holder[adapter_name] = nn.Parameter(
                    torch.empty_like(holder[adapter_name], device=weight.device, dtype=dtype)
                )
            else:
                holder[adapter_name].to_empty(device=weight.device).to(dtype)
        with torch.no_grad():
            self.reset(adapter_name, config.init_lora_weights)
        if config.use_dora:
            dora.init_magnitude(self, adapter_name)

    def reference_weight(self) -> torch.Tensor:
        """The base tensor whose device (and float dtype) the factors take."""
        return self.get_base_layer().weight

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight: model code reads it through the wrapper (T5 casts to ``wo.weight.dtype``)."""
        return self.get_base_layer().weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.get_base_layer().bias

    def create(self, adapter_name: str, r: int, bias: bool) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def reset(self, adapter_name: str, init: bool | str) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def delta_weight(self, adapter_name: str) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def bias_delta(self, adapter_name: str) -> torch.Tensor | None:
        """s c: what ``lora_bias`` adds to every output (out,), or None without a bias on B."""
        b = self._modules[self.adapter_param_names[1]][adapter_name]  # no attribute lookups: runs per call
        c = b._parameters.get("bias") if isinstance(b, nn.Module) else None  # a bare Parameter B (embeddings): none
        return None if c is None else c * self.scaling[adapter_name]

    def check_mergeable(self, adapter_names: list[str]) -> None:
        """MergeError before anything changes when an adapter's B bias has no base bias to fold into."""
        with_bias = [n for n in adapter_names if self.bias_delta(n) is not None]
        if with_bias and getattr(self.get_base_layer(), "bias", None) is None:
            raise MergeError(
                f"Adapters {with_bias} have lora_bias=True but the wrapped {type(self.get_base_layer()).__name__} "
                "has no bias to fold it into, so they cannot merge (as in peft). Keep them unmerged."
            )

    def merge(self, adapter_names: list[str]) -> None:
        self.check_mergeable(adapter_names)
        base = self.get_base_layer()
        with torch.no_grad():
            for name in adapter_names:
                delta = dora.merge_delta(self, name) if dora.is_dora(self, name) else self.delta_weight(name)
                base.weight += delta.to(base.weight.dtype)
                c = self.bias_delta(name)
                if c is not None:
                    base.bias += c.to(base.bias.dtype)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        base = self.get_base_layer()
        with torch.no_grad():
            while self.merged_adapters:
                name = self.merged_adapters[-1]
                delta = dora.unmerge_delta(self, name) if dora.is_dora(self, name) else self.delta_weight(name)
                self.merged_adapters.pop()
                base.weight -= delta.to(base.weight.dtype)
                c = self.bias_delta(name)
                if c is not None:
                    base.bias -= c.to(base.bias.dtype)

    def stacked_factors(self, dtype: torch.dtype) -> FactorStack:
        """Every adapter of this layer, in the order added, ranks zero-padded: A (n, in, r_max), B (n, r_max, out)
        with the scaling folded in, and the B biases s c (n, out) (None when no adapter has one). Independent of
        which adapters a call routes, so it is cached across calls until an adapter, a scaling or a factor changes:
        nothing registered in the process since (``registrations``: a new adapter, a replaced parameter) and the
        same version counters (an in-place update; not read inside ``fixed_weights()``). The check runs per layer
        per routed call, so it reads no module."""
        key = (dtype, registrations(), tuple(self.scaling.items()))
        cached = self._stack_cache
        if cached is not None and cached[0] == key:
            tensors = cached[2]
            current = weights_fixed() or cached[3] == [t._version for t in tensors]
            if current and tensors[0].device == cached[1].a.device:
                return cached[1]
        with torch.no_grad():
            return self._restack(key, dtype)

    def _restack(self, key: tuple, dtype: torch.dtype) -> FactorStack:
        tensors = self._stack_tensors()
        names = list(self.r)
        r_max = max(self.r.values())
        probe_a, probe_b = self.factors(names[0])
        a_stack = probe_a.new_zeros(len(names), probe_a.shape[1], r_max, dtype=dtype)
        b_stack = probe_b.new_zeros(len(names), r_max, probe_b.shape[0], dtype=dtype)
        biases = {}
        for k, name in enumerate(names):
            a, b = self.factors(name)
            a_stack[k, :, : a.shape[0]] = a.T
            b_stack[k, : b.shape[1], :] = (b * self.scaling[name]).T
            biases[k] = self.bias_delta(name)
        c_stack = None
        if any(c is not None for c in biases.values()):
            c_stack = b_stack.new_zeros(len(names), b_stack.shape[2])
            for k, c in biases.items():
                if c is not None:
                    c_stack[k] = c
        stack = FactorStack({name: k for k, name in enumerate(names)}, a_stack, b_stack, c_stack)
        self._stack_cache = (key, stack, tensors, [t._version for t in tensors])
        return stack

    def _stack_tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors the stack is built from (A, B and B's bias of every adapter), read without module lookups:
        this runs once per layer per routed call."""
        out: list[torch.Tensor] = []
        holders = [self._modules[attr] for attr in self.adapter_param_names[:2]]
        for name in self.r:
            for holder in holders:
                item = holder._parameters.get(name) if isinstance(holder, nn.ParameterDict) else None
                out.extend([item] if item is not None else holder[name]._parameters.values())
        return tuple(t for t in out if t is not None)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._stack_cache = None  # its factors are not kept alive by the stack

    def has_routed_adapters(self, routing: Routing | None = None) -> bool:
        """Whether ``routing`` (default: this call's) routes any row to one of this layer's adapters."""
        return any(n in self.r for n in (routing or self.routing).names)


class LoraLinear(LoraLayer):
    """LoRA on nn.Linear, and on GPT-2's Conv1D (``fan_in_fan_out``: weight (in, out), ΔW transposed)."""

    adapter_param_names = ("lora_A", "lora_B")  # + "lora_magnitude_vector" once a DoRA adapter is added
    dora_layout = "linear"
    supports_weight_inits = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.fan_in_fan_out = is_conv1d_gpt2(self.get_base_layer())

    def create(self, adapter_name: str, r: int, bias: bool) -> None:
        out_f, in_f = self.get_base_layer().weight.shape
        if self.fan_in_fan_out:
            in_f, out_f = out_f, in_f
        self.lora_A[adapter_name] = nn.Linear(in_f, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, out_f, bias=bias)

    def reset(self, adapter_name: str, init: bool | str) -> None:
        if inits.is_weight_init(init):  # PiSSA / OLoRA: A, B from the base weight, the residual left in it
            inits.init_from_weight(self, adapter_name, init)
            return
        if init is False:  # the layers' own random init for A and B: not an identity at start
            self.lora_A[adapter_name].reset_parameters()
            self.lora_B[adapter_name].reset_parameters()
            return
        a = self.lora_A[adapter_name].weight
        if init == "gaussian":
            nn.init.normal_(a, std=1 / self.r[adapter_name])
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[adapter_name].weight)
        if self.lora_B[adapter_name].bias is not None:  # lora_bias: zero too, so the start is the identity
            nn.init.zeros_(self.lora_B[adapter_name].bias)

    def factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        a, b = self.factors(adapter_name)
        delta = (b @ a) * self.scaling[adapter_name]  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def _plain_weight(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor | None:
        """The base weight as (in, out) when the base is a plain Linear / Conv1D this call can bypass, else None."""
        base = self._modules["base_layer"]  # read per call: no module attribute lookups on this path
        plain = type(base) is nn.Linear or (self.fan_in_fan_out and is_conv1d_gpt2(base))
        if (
            not plain
            or args
            or kwargs
            or base._forward_hooks
            or base._forward_pre_hooks
            or nn.modules.module._global_forward_hooks
        ):
            return None
        weight = base._parameters["weight"]
        if x.dtype != weight.dtype or torch.is_autocast_enabled(x.device.type):  # autocast: addmm_ is not cast
            return None
        if weight.dtype != next(iter(self._modules["lora_A"]._modules.values()))._parameters["weight"].dtype:
            return None
        return weight if self.fan_in_fan_out else weight.T

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """W x + b + sum_a s_a B_a A_a x. On a plain base layer the low-rank terms (and b) are computed first and
        the base GEMM accumulates into them (``addmm``), which saves two passes over the output; while training,
        through ``autograd.LoraLinearFunction``, which keeps less for backward (``autograd.set_lora_backward``)."""
        routing = None if self.disabled else self.routing
        routed = routing is not None
        live = self.live_adapters() if not routed else []
        if not live and not (routed and self.has_routed_adapters(routing)):
            return self.base_layer(x, *args, **kwargs)
        if self._modules["lora_magnitude_vector"] and dora.uses_dora(self, routing.names if routed else live):
            return dora.forward(self, x, live, *args, **kwargs)
        weight_t = self._plain_weight(x, *args, **kwargs)  # (in, out) or None
        if weight_t is None:
            result = self.base_layer(x, *args, **kwargs)  # (..., out)
            delta = self._routed(x, None) if routed else self._beside(x, live)
            return result + delta.reshape(result.shape).to(result.dtype)
        if not routed:  # LoRA's own backward (methods/lora/autograd.py): keeps x, A d(x) and mask bits only
            fused = autograd.lora_linear(self, x, weight_t, live)
            if fused is not None:
                return fused
        bias = self._modules["base_layer"]._parameters["bias"]  # a plain Linear / Conv1D here
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        delta = self._routed(x, bias) if routed else self._delta(x2, live, bias)  # (N, out)
        # in place: delta is a fresh tensor no backward needs, so the GEMM accumulates into it without a copy
        return delta.reshape(x2.shape[0], -1).addmm_(x2, weight_t).reshape(*x.shape[:-1], -1)

    def _beside(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        """sum_a s_a B_a A_a x beside a base layer this call runs itself (quantized, hooked, another dtype): through
        LoRA's own backward where it applies (a bf16 input then stays the one kept, not an fp32 copy), else plainly."""
        fused = autograd.lora_linear(self, x, None, names)
        return fused if fused is not None else self._delta(x.reshape(-1, x.shape[-1]), names, None)

    def _delta(self, x2: torch.Tensor, names: list[str], bias: torch.Tensor | None) -> torch.Tensor:
        """bias + sum_a s_a ((x A_a^T) B_a^T + c_a) for rows x2 (N, in); the scale is applied to the small (N, r)
        term (c_a: B's bias under lora_bias, else 0)."""
        acc = bias
        holders = self._modules  # read directly: this runs per layer per call (decoding: per token)
        for name in names:
            lora_a, lora_b = holders["lora_A"]._modules[name], holders["lora_B"]._modules[name]
            dropout = holders["lora_dropout"]._modules[name]
            h = x2.to(lora_a._parameters["weight"].dtype)
            h = lora_a(dropout(h) if dropout.training else h) * self.scaling[name]  # (N, r); eval: no dropout
            b_t = lora_b._parameters["weight"].T
            acc = torch.mm(h, b_t) if acc is None else torch.addmm(acc, h, b_t)  # (N, out)
            c = self.bias_delta(name)
            if c is not None:
                acc = acc + c
        return acc

    def _routed(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Each row through its own adapter, no row loop: rows grouped by adapter (rows.py), else gathered factors."""
        stack = self.stacked_factors(x.dtype)
        delta, layout = grouped_delta(self.routing, x, stack, bias)  # (B, T, out) or None
        return delta if delta is not None else gathered_delta(x, stack, layout, bias)


class LoraEmbedding(LoraLayer):
    """LoRA on nn.Embedding: A is an (r, num_embeddings) table looked up by token id, B maps r -> dim."""

    adapter_param_names = ("lora_embedding_A", "lora_embedding_B")
    supports_lora_bias = False  # as in peft: B is a bare Parameter
    dora_layout = "embedding"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def create(self, adapter_name: str, r: int, bias: bool) -> None:
        num, dim = self.get_base_layer().weight.shape
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.randn(r, num))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.randn(dim, r))

    def reset(self, adapter_name: str, init: bool | str) -> None:
        if init is False:  # random A and B (standard normal): not an identity at start
            nn.init.normal_(self.lora_embedding_A[adapter_name])
            nn.init.normal_(self.lora_embedding_B[adapter_name])
            return
        nn.init.zeros_(self.lora_embedding_A[adapter_name])
        nn.init.normal_(self.lora_embedding_B[adapter_name])

    def factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        a, b = self.factors(adapter_name)
        return (b @ a).T * self.scaling[adapter_name]  # (num, dim)

    def _lookup(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        return F.embedding(
            ids, table, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
        )

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.lora_magnitude_vector and not self.disabled:
            return dora.forward_embedding(self, x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)  # (..., dim)
        if self.routing is not None and not self.disabled:
            return result + self._routed(x).to(result.dtype) if self.has_routed_adapters() else result
        for name in self.live_adapters():
            a, b = self.factors(name)
            h = self._lookup(x, a.T)  # (..., r)
            result = result + ((h @ b.T) * self.scaling[name]).to(result.dtype)
        return result

    def _routed(self, x: torch.Tensor) -> torch.Tensor:
        stack = self.stacked_factors(self.get_base_layer().weight.dtype)  # A (n, num, r), B (n, r, dim)
        slots = torch.tensor(stack.slots_of(self.routing.names), dtype=torch.long, device=x.device)
        rows = slots[self.routing.rows(x.shape[0])]  # (B,) stack slot, -1: the base model
        ids = x.reshape(x.shape[0], -1)  # (B, T)
        slot = rows.clamp(min=0)  # base-model rows read slot 0, zeroed below
        h = stack.a[slot[:, None], ids] * (rows >= 0).to(stack.a.dtype)[:, None, None]  # (B, T, r)
        delta = torch.bmm(h, stack.b[slot])  # (B, T, dim)
        return delta.reshape(*x.shape, delta.shape[-1])


def factors_of(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The A and B tensors of any LoRA layer in their own shapes (A: (r, ...), B: (out, r, ...))."""
    a, b = (getattr(layer, attr)[name] for attr in layer.adapter_param_names[:2])
    return (a if isinstance(a, nn.Parameter) else a.weight), (b if isinstance(b, nn.Parameter) else b.weight)
