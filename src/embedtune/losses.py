"""Contrastive losses for embedding training: InfoNCE/MNRL with hard negatives, symmetric and
Matryoshka variants, across GPUs, and a cached (GradCache-style) form whose memory does not grow
with the batch.

`ColumnLoss` holds what every embedtune loss shares (the merged packed forward over all columns, the
cached mode); `ContrastiveLoss` is InfoNCE on it, and `shape_losses` holds the losses of the other
data shapes (triplet, CoSENT, AnglE, MarginMSE, KL) on the same base.

`ContrastiveLoss` is a sentence-transformers loss module (`forward(sentence_features, labels)`), so
it drops into `SentenceTransformerTrainer` like `MultipleNegativesRankingLoss`. Columns are
(anchor, positive, negative_1, ..., negative_n); every anchor is scored against every positive and
negative in the batch, and under torch.distributed against those of every rank.

Cached mode, for batches that do not fit in memory at once:
  1. embed every column without a graph, in chunks of at most `token_budget` real tokens;
  2. compute the loss on those embeddings and its gradient with respect to them;
  3. when the trainer calls `backward()`, re-run each chunk with a graph (same dropout masks: the
     RNG state of each chunk is replayed) and backpropagate the cached embedding gradients.
Peak memory is one chunk's activations plus the embeddings, whatever the batch size. The last
chunk keeps its graph from step 1, so the re-run costs one chunk less.

Scaling across ranks: each rank's loss is the mean over its own anchors against the gathered
candidates; the gather's backward sums gradients over ranks and DDP averages them, which together
give exactly the gradient of the global mean loss over all ranks' anchors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpointing import current_autocast

DEFAULT_TOKEN_BUDGET = 16384  # cached chunks off the GPU or off the packed path
# Activations a packed training forward keeps, in bytes per token per layer per hidden unit:
# measured 46-47 for BERT-base (LoRA and full, bf16 autocast, eager) on an H200; rounded up.
ACTIVATION_BYTES_PER_UNIT = 48
GPU_BUDGET_RANGE = (4096, 131072)


def gpu_token_budget(free_bytes: int, layers: int, hidden: int, share: float = 1 / 3) -> int:
    """Real tokens per cached chunk that keep one chunk's activations within `share` of the free GPU
    memory: big chunks are few launches (at 1,024 pairs of BERT-base on an H200, 64k-token chunks cost
    1.3x the uncached step, 16k-token chunks 1.6x), yet memory stays bounded by the chunk whatever
    the batch size. Clamped to `GPU_BUDGET_RANGE`, in multiples of 1,024."""
    tokens = int(free_bytes * share / (ACTIVATION_BYTES_PER_UNIT * layers * hidden))
    low, high = GPU_BUDGET_RANGE
    return max(low, min(high, tokens // 1024 * 1024))


# ----------------------------------------------------------------------------------- distributed


def _world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's rows."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        import torch.distributed as dist

        ctx.rank, world = _world()
        ctx.rows = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss depends on these rows
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(tensor: Tensor) -> Tensor:
    """Concatenate `tensor` from all ranks (rank order); gradients flow back to each rank's part."""
    if _world()[1] == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


# ----------------------------------------------------------------------------------- the loss math


def info_nce(anchors: Tensor, candidates: Sequence[Tensor], temperature: float, symmetric: bool,
             gather: bool = True) -> Tensor:
    """InfoNCE of this rank's anchors against all positives and negatives (of all ranks).

    `anchors` and each candidate column are [B, d] and already normalized; candidates[0] holds the
    positives. With `symmetric`, the mean with the reverse direction: each positive must pick its
    own anchor among all anchors.
    """
    rank, world = _world() if gather else (0, 1)
    batch = anchors.shape[0]
    gathered = [gather_with_grad(c) for c in candidates] if world > 1 else list(candidates)
    labels = torch.arange(batch, device=anchors.device) + rank * batch
    scores = anchors @ torch.cat(gathered, dim=0).T / temperature
    loss = F.cross_entropy(scores, labels)
    if symmetric:
        all_anchors = gather_with_grad(anchors) if world > 1 else anchors
        reverse = candidates[0] @ all_anchors.T / temperature
        loss = (loss + F.cross_entropy(reverse, labels)) / 2
    return loss


def contrastive_loss(embeddings: Sequence[Tensor], temperature: float = 0.05, symmetric: bool = False,
                     matryoshka_dims: Sequence[int] | None = None,
                     matryoshka_weights: Sequence[float] | None = None, gather: bool = True) -> Tensor:
    """The loss from raw column embeddings [anchor, positive, negatives...], each [B, d].

    Cosine similarity (embeddings are normalized here). With `matryoshka_dims`, the weighted sum
    of the loss on each leading slice of the embedding, so truncated embeddings also retrieve well.
    """
    if len(embeddings) < 2:
        raise ValueError(f"a contrastive loss needs anchor and positive columns, got {len(embeddings)} column(s)")
    dims = list(matryoshka_dims) if matryoshka_dims else [embeddings[0].shape[-1]]
    weights = list(matryoshka_weights) if matryoshka_weights else [1.0] * len(dims)
    total = 0.0
    for dim, weight in zip(dims, weights):
        cut = [F.normalize(e[..., :dim].float(), dim=-1) for e in embeddings]
        total = total + weight * info_nce(cut[0], cut[1:], temperature, symmetric, gather)
    return total


# ----------------------------------------------------------------------------------- chunking


def _batch_size(features: dict[str, Any]) -> int:
    return features["input_ids"].shape[0] if "input_ids" in features else features["attention_mask"].shape[0]


def plan_chunks(attention_mask: Tensor, token_budget: int, lengths: list[int] | None = None) -> list[slice]:
    """Consecutive row ranges whose real tokens stay within `token_budget` (at least one row each)."""
    if lengths is None:
        lengths = attention_mask.sum(dim=1).tolist()
    chunks, start, used = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and used + n > token_budget:
            chunks.append(slice(start, i))
            start, used = i, 0
        used += n
    chunks.append(slice(start, len(lengths)))
    return chunks


def padding_side(attention_mask: Tensor) -> str | None:
    """"right" or "left" when every row's real tokens sit together at that end, else None."""
    mask = attention_mask.bool()
    width = mask.shape[1]
    lengths = mask.sum(dim=1, keepdim=True)
    positions = torch.arange(width, device=mask.device)[None, :]
    if torch.equal(mask, positions < lengths):
        return "right"
    if torch.equal(mask, positions >= width - lengths):
        return "left"
    return None


def slice_features(features: dict[str, Any], rows: slice, width: int | None = None,
                   side: str | None = "detect") -> dict[str, Any]:
    """The rows of a tokenized batch, with the padding columns no row in them needs dropped.

    `width` (the longest real row among `rows`) and `side` (`padding_side` of the whole batch) can be
    given when known, which saves the host syncs of finding them out per chunk.
    """
    batch = _batch_size(features)
    out = {k: (v[rows] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == batch else v)
           for k, v in features.items()}
    mask = out.get("attention_mask")
    if mask is None or mask.dim() != 2 or mask.shape[0] == 0:
        return out
    full = mask.shape[1]
    if side == "detect":
        side = padding_side(mask)
    if width is None:
        width = int(mask.sum(dim=1).max())
    if side is None or width >= full:
        return out
    keep = slice(0, width) if side == "right" else slice(full - width, full)
    return {k: (v[:, keep] if isinstance(v, Tensor) and v.dim() == 2 and v.shape[1] == full else v)
            for k, v in out.items()}


def merge_columns(features: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The columns' tokenized batches as one batch (rows stacked, widths padded to the widest on the
    tokenizer's side), or None when they cannot be merged exactly (different keys or per-column
    settings such as a prompt length, mixed padding sides, tensors that are not per row and token)."""
    keys = features[0].keys()
    if any(f.keys() != keys for f in features) or "attention_mask" not in keys:
        return None
    # a column without padding fits either side
    sides = {padding_side(f["attention_mask"]) for f in features if not bool(f["attention_mask"].all())}
    if len(sides) > 1 or None in sides:
        return None
    side = sides.pop() if sides else "right"
    width = max(f["attention_mask"].shape[1] for f in features)
    merged: dict[str, Any] = {}
    for key in keys:
        values = [f[key] for f in features]
        if not all(isinstance(v, Tensor) for v in values):
            if any(isinstance(v, Tensor) or v != values[0] for v in values):
                return None
            merged[key] = values[0]
            continue
        if any(v.dim() != 2 or v.shape != f["attention_mask"].shape for v, f in zip(values, features)):
            return None
        padded = []
        for v in values:  # padding slots are masked out; 0 is as good a filler as any
            extra = width - v.shape[1]
            padded.append(F.pad(v, (extra, 0) if side == "left" else (0, extra)) if extra else v)
        merged[key] = torch.cat(padded)
    return merged


@dataclass
class ColumnChunks:
    """How one column of a batch is cut into chunks, found out once (two host syncs per column)."""

    rows: list[slice]
    widths: list[int]  # longest real row per chunk
    side: str | None  # padding side of the column

    @classmethod
    def plan(cls, features: dict[str, Any], token_budget: int) -> "ColumnChunks":
        mask = features["attention_mask"]
        lengths = mask.sum(dim=1).tolist()
        rows = plan_chunks(mask, token_budget, lengths)
        return cls(rows, [max(lengths[r]) for r in rows], padding_side(mask))

    def chunk(self, features: dict[str, Any], k: int) -> dict[str, Any]:
        return slice_features(features, self.rows[k], self.widths[k], self.side)


class _RngState:
    """The CPU (and current CUDA device's) RNG state, to replay a chunk with the same dropout masks."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def _varied_shape_attention(device: torch.device):
    """On the GPU, keep masked attention off cuDNN while chunking: cuDNN builds an execution plan
    for every new shape, and every chunk brings one (measured: a cached LoRA step took 16x the
    uncached one with cuDNN, 2.3x without)."""
    import contextlib

    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class _ReplayOnBackward(torch.autograd.Function):
    """Carries the loss value; its backward runs the cached chunks' backward passes."""

    @staticmethod
    def forward(ctx, loss: Tensor, anchor: Tensor, replay: Callable[[Tensor], None]) -> Tensor:
        ctx.replay = replay
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        with torch.enable_grad():
            ctx.replay(grad_output)
        return None, None, None


def _unwrap_ddp(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """(module to run, the DDP wrapper or None). Cached chunks bypass DDP: ranks may run different
    numbers of chunks, and DDP's per-forward buffer sync and per-backward all-reduce would deadlock."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return model.module, model
    return model, None


def _fsdp_fillers(module: nn.Module, chunks: int, sharded: bool) -> int:
    """Under FSDP every forward and backward is a collective, so all ranks must run as many chunks.
    How many one-row filler chunks (no effect on the loss or gradients) this rank adds to match the
    rank with the most; 0 without FSDP."""
    import torch.distributed as dist

    if not sharded or _world()[1] == 1:
        return 0
    count = torch.tensor([chunks], device=next(module.parameters()).device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count) - chunks


def _all_reduce_gradients(module: nn.Module) -> None:
    """Average parameter gradients over ranks: what DDP would have done for the cached chunks."""
    import torch.distributed as dist

    _, world = _world()
    grads = [p.grad for p in module.parameters() if p.requires_grad and p.grad is not None]
    if world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


# ----------------------------------------------------------------------------------- the module


class ColumnLoss(nn.Module):
    """What every embedtune loss shares: the columns' embeddings from one merged forward on the packed
    fast path (`embed_columns`), and the cached (GradCache-style) mode that embeds in chunks without
    graphs and replays them on backward (`cached=True`). A subclass only states its math, in
    `loss_from_embeddings(embeddings, labels)`; the scores or teacher scores of the batch (`labels`, as
    sentence-transformers' collator hands them) go through the cached mode unchanged.

    Args:
        model: the SentenceTransformer being trained.
        cached: GradCache-style; memory flat in the batch size, chunks of `token_budget` tokens.
        token_budget: real tokens per chunk in cached mode (default: sized from the free GPU memory on
            the packed path, see `gpu_token_budget`; else `DEFAULT_TOKEN_BUDGET`).
    """

    def __init__(self, model: nn.Module, cached: bool = False, token_budget: int | None = None):
        super().__init__()
        if token_budget is not None and token_budget < 1:
            raise ValueError(f"token_budget must be positive, got {token_budget}")
        self.model = model
        self.cached = cached
        self.token_budget = token_budget  # None: chosen at the first cached step (`_chunk_budget`)
        self._scan: dict[str, bool] | None = None

    def loss_from_embeddings(self, embeddings: Sequence[Tensor], labels: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def forward(self, sentence_features: Iterable[dict[str, Any]], labels: Tensor | None = None) -> Tensor:
        features = list(sentence_features)
        if self.cached and torch.is_grad_enabled():
            return self._cached_forward(features, labels)
        return self.loss_from_embeddings(self.embed_columns(features), labels)

    def embed_columns(self, features: list[dict[str, Any]]) -> list[Tensor]:
        """Each column's embeddings. On the packed fast path all columns go through one forward (one
        token stream: half the kernel launches of a forward per column, and padding costs nothing)."""
        merged = self._merged(features)
        if merged is not None:
            batch, rows = merged
            return list(self.model(batch)["sentence_embedding"].split(rows))
        return [self.model(f)["sentence_embedding"] for f in features]

    def merged_columns(self, features: list[dict[str, Any]]) -> tuple[dict[str, Any], list[int]] | None:
        """All columns as one batch and each column's row count, as `embed_columns` runs them in one
        forward on the packed path; None where it runs a forward per column (see `_merged`). What a
        step that runs the model itself (`embedtune.graphs`) feeds it."""
        return self._merged(features)

    @property
    def runs_sharded(self) -> bool:
        """Whether the model this loss runs is sharded (FSDP)."""
        return self._model_scan()["sharded"]

    def _merged(self, features: list[dict[str, Any]]) -> tuple[dict[str, Any], list[int]] | None:
        """All columns as one batch and each column's row count, when the model runs packed and the
        columns merge exactly; else None. `prompt_length` (set on prompted columns only) is dropped
        when no pooling reads it, so columns with and without a prompt (E5's "query: ") still merge."""
        if len(features) < 2 or not self._runs_packed():
            return None
        if not self._model_scan()["reads_prompt_length"]:
            features = [{k: v for k, v in f.items() if k != "prompt_length"} for f in features]
        batch = merge_columns(features)
        return None if batch is None else (batch, [_batch_size(f) for f in features])

    def _model_scan(self) -> dict[str, bool]:
        """What the model is made of, as far as this loss cares: found once (a walk over every module)."""
        if self._scan is None:
            from torch.distributed.fsdp import FSDPModule

            from .packing import PackedForward

            modules = list(self.model.modules())
            self._scan = {
                "packed": any(isinstance(m.__dict__.get("forward"), PackedForward) for m in modules),
                "sharded": any(isinstance(m, FSDPModule) for m in modules),
                "reads_prompt_length": any(not getattr(m, "include_prompt", True) for m in modules),
            }
        return self._scan

    def _runs_packed(self) -> bool:
        return self._model_scan()["packed"]

    def _chunk_budget(self, device: torch.device) -> int:
        """The user's token budget, else: on a GPU with the packed path, sized from the memory free now
        and the model's depth and width (`gpu_token_budget`); otherwise `DEFAULT_TOKEN_BUDGET` (padded
        chunks hold padding too, which real-token counts do not see). Chosen once per loss."""
        if self.token_budget is None:
            config = next((m.config for m in self.model.modules()
                           if hasattr(getattr(m, "config", None), "num_hidden_layers")), None)
            hidden = getattr(config, "hidden_size", None)
            if device.type == "cuda" and self._runs_packed() and hidden:
                free, _ = torch.cuda.mem_get_info(device)
                free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
                self.token_budget = gpu_token_budget(free, config.num_hidden_layers, hidden)
            else:
                self.token_budget = DEFAULT_TOKEN_BUDGET
        return self.token_budget

    def _cached_forward(self, features: list[dict[str, Any]], labels: Tensor | None = None) -> Tensor:
        module, ddp = _unwrap_ddp(self.model)
        device = features[0]["attention_mask"].device
        rows = None
        merged = self._merged(features)  # one token stream: chunks fill across columns
        if merged is not None:
            batch, rows = merged
            features = [batch]
        with _varied_shape_attention(device):
            loss, replay = self._embed_and_plan_replay(module, ddp, features, rows, labels)
        # The trainer calls backward() outside its autocast block: re-run the chunks under the same
        # autocast as the first pass, else they run in fp32, slower and not the embeddings we cached.
        autocast = current_autocast(device)

        def replay_with_kernels(grad_output: Tensor) -> None:
            with _varied_shape_attention(device), autocast():
                replay(grad_output)

        anchor = torch.zeros((), requires_grad=True, device=loss.device)
        return _ReplayOnBackward.apply(loss.detach(), anchor, replay_with_kernels)

    def _embed_and_plan_replay(self, module: nn.Module, ddp, features: list[dict[str, Any]],
                               rows: list[int] | None = None, labels: Tensor | None = None):
        """Embed `features` chunk by chunk without graphs; `rows` splits a merged batch back into columns."""
        budget = self._chunk_budget(features[0]["attention_mask"].device)
        plans = [ColumnChunks.plan(f, budget) for f in features]
        last = (len(features) - 1, len(plans[-1].rows) - 1)
        fillers = _fsdp_fillers(module, sum(len(p.rows) for p in plans), self._model_scan()["sharded"])
        filler = slice_features(features[0], slice(0, 1))
        states: dict[tuple[int, int], _RngState] = {}
        kept_graph: Tensor | None = None
        columns: list[Tensor] = []
        for c, (feats, plan) in enumerate(zip(features, plans)):
            parts = []
            for k in range(len(plan.rows)):
                chunk = plan.chunk(feats, k)
                device = chunk["attention_mask"].device
                if (c, k) == last:  # keep this chunk's graph: no need to re-run it
                    for _ in range(fillers):
                        with torch.no_grad():
                            module(filler)
                    kept_graph = module(chunk)["sentence_embedding"]
                    parts.append(kept_graph.detach())
                    continue
                states[(c, k)] = _RngState(device)
                with torch.no_grad():
                    parts.append(module(chunk)["sentence_embedding"].detach())
            columns.append(torch.cat(parts).requires_grad_())
        loss = self.loss_from_embeddings(columns if rows is None else list(columns[0].split(rows)), labels)
        column_grads = torch.autograd.grad(loss, columns)

        def replay(grad_output: Tensor) -> None:
            for c, (feats, plan) in enumerate(zip(features, plans)):
                for k, rows in enumerate(plan.rows):
                    grad = column_grads[c][rows] * grad_output
                    if (c, k) == last:
                        for _ in range(fillers):
                            out = module(filler)["sentence_embedding"]
                            out.backward(torch.zeros_like(out))
                        kept_graph.backward(grad.to(kept_graph.dtype))
                        continue
                    with torch.random.fork_rng(devices=[states[(c, k)].device] if states[(c, k)].cuda is not None else []):
                        states[(c, k)].restore()
                        out = module(plan.chunk(feats, k))["sentence_embedding"]
                    out.backward(grad.to(out.dtype))
            if ddp is not None:
                _all_reduce_gradients(module)

        return loss, replay

    @property
    def citation(self) -> str:
        """For the model card's citations, where the cached mode ran; an uncached loss cites nothing (the
        card reads an AttributeError as no citation)."""
        if not self.cached:
            raise AttributeError("citation: only the cached (GradCache) mode has one")
        return "GradCache: Gao et al., 2021, Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"


class ContrastiveLoss(ColumnLoss):
    """InfoNCE over in-batch (and cross-rank) positives and hard negatives; a sentence-transformers loss.

    Args:
        model: the SentenceTransformer being trained.
        temperature: softmax temperature over cosine scores (0.05 = MNRL's scale of 20).
        symmetric: also train positive -> anchor (mean of both directions).
        matryoshka_dims: train leading slices of the embedding too, e.g. [768, 512, 256, 128, 64].
        matryoshka_weights: one weight per dim (default 1 each).
        cached, token_budget: see `ColumnLoss`.
        gather_across_devices: under torch.distributed, score against every rank's candidates.
    """

    def __init__(self, model: nn.Module, temperature: float = 0.05, symmetric: bool = False,
                 matryoshka_dims: Sequence[int] | None = None, matryoshka_weights: Sequence[float] | None = None,
                 cached: bool = False, token_budget: int | None = None, gather_across_devices: bool = True):
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if matryoshka_dims is not None:
            matryoshka_dims = [int(d) for d in matryoshka_dims]
            if not matryoshka_dims or min(matryoshka_dims) < 1:
                raise ValueError(f"matryoshka_dims must be positive integers, got {matryoshka_dims}")
            if matryoshka_weights is not None and len(matryoshka_weights) != len(matryoshka_dims):
                raise ValueError("matryoshka_weights needs one weight per dimension")
        super().__init__(model, cached=cached, token_budget=token_budget)
        self.temperature = float(temperature)
        self.symmetric = symmetric
        self.matryoshka_dims = matryoshka_dims
        self.matryoshka_weights = list(matryoshka_weights) if matryoshka_weights else None
        self.gather_across_devices = gather_across_devices

    def loss_from_embeddings(self, embeddings: Sequence[Tensor], labels: Tensor | None = None) -> Tensor:
        return contrastive_loss(embeddings, self.temperature, self.symmetric, self.matryoshka_dims,
                                self.matryoshka_weights, gather=self.gather_across_devices)
