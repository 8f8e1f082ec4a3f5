"""Cross-image pixel contrast (Wang et al., "Exploring Cross-Image Pixel Contrast for Semantic
Segmentation", 2021) as an auxiliary loss for the co-segmentation trainer.

Our supervision has two classes per token: ``1`` = the repeated region, ``0`` = everything else
(negative pairs are all background). A :class:`ProjectionHead` maps the head's last hidden tokens to
L2-normalised embeddings; :class:`PixelContrastLoss` pulls embeddings of the same class together and
pushes the other class away, across both images of a pair, across the batch, and -- through per-class
memory queues of embeddings from earlier batches -- across images the model saw before.

Per step (``forward``):

1. Labels ``gt > 0.5`` per token; the prediction thresholded at 0.5 marks *hard* tokens (label and
   prediction disagree) and *easy* ones. For each class, ``anchors_per_class`` anchors are drawn from
   all tokens of the batch (both images of every pair), half hard and half easy; when one kind is short
   the other fills in (as in the reference implementation). All draws use only the ``generator``
   argument, so a seeded generator makes the loss reproducible and the global RNG is never touched.
2. Contrast set = the sampled anchors of both classes (in-batch, both images; the anchor itself
   excluded) + the pixel queue + the region queue of every class. Like the reference implementation we
   contrast against sampled anchors rather than every token of the batch: with 20 pairs of 30x30 grids
   that would be 36k x 1k logits per step for little gain over the queues.
3. Per anchor i with positives P_i (same class) and negatives N_i (other class), temperature tau::

       L_i = -1/|P_i| sum_{p in P_i} log( e^{s_ip/tau} / (e^{s_ip/tau} + sum_{n in N_i} e^{s_in/tau}) )

   averaged over anchors with at least one positive. Anchors with no negatives contribute 0 (their
   positives are the whole denominator); a batch with no usable anchor gives an exact 0 that is still
   connected to the embeddings, so DDP sees a gradient (of zeros) for the projection head.
4. After the loss, queues are updated (detached, FIFO with wrap-around): for every image and class
   present, ``pixels_per_image`` random token embeddings go to the pixel queue and the L2-normalised
   mean embedding of the class region goes to the region queue. When ``torch.distributed`` is
   initialised the pushed rows are all-gathered first (in rank order), so every rank holds the same
   queues.

The loss runs in float32 with autocast off: cosine logits divided by a small temperature lose too much
in half precision.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

BACKGROUND, REPEATED = 0, 1
NUM_CLASSES = 2

# Defaults, next to the code that uses them. Temperature and queue size follow the reference
# implementation (tau 0.1, 5000 entries per class); anchors_per_class keeps the logit matrix small.
DEFAULT_PROJ_DIM = 256
DEFAULT_TEMPERATURE = 0.1
DEFAULT_QUEUE_SIZE = 5000
DEFAULT_ANCHORS_PER_CLASS = 256
DEFAULT_PIXELS_PER_IMAGE = 10


class ProjectionHead(nn.Module):
    """1x1 conv, BN, ReLU, 1x1 conv to ``proj_dim``, L2-normalised over channels.

    forward(tokens: [B, in_dim, h, w]) -> [B, proj_dim, h, w] with unit norm at every location.
    Trained beside the mask/correspondence head and unused at inference.
    """

    def __init__(self, in_dim: int, proj_dim: int = DEFAULT_PROJ_DIM):
        super().__init__()
        if in_dim <= 0 or proj_dim <= 0:
            raise ValueError(f"ProjectionHead: in_dim and proj_dim must be positive, got {in_dim}, {proj_dim}")
        self.in_dim = in_dim
        self.proj_dim = proj_dim
        self.net = nn.Sequential(
            nn.Conv2d(in_dim, in_dim, kernel_size=1, bias=False),
            nn.BatchNorm2d(in_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_dim, proj_dim, kernel_size=1),
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 4 or tokens.shape[1] != self.in_dim:
            raise ValueError(f"ProjectionHead expects [B, {self.in_dim}, h, w] tokens, got {tuple(tokens.shape)}")
        return F.normalize(self.net(tokens), dim=1)


class PixelContrastLoss(nn.Module):
    """Supervised pixel contrast with per-class pixel and region memory queues.

    Queues are registered buffers (saved with the module's state_dict): ``pixel_queue`` and
    ``region_queue`` are [2, queue_size, embed_dim]; ``*_ptr`` is the next slot to write per class and
    ``*_count`` the number of filled slots per class.
    """

    def __init__(
        self,
        temperature: float = DEFAULT_TEMPERATURE,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        anchors_per_class: int = DEFAULT_ANCHORS_PER_CLASS,
        pixels_per_image: int = DEFAULT_PIXELS_PER_IMAGE,
        embed_dim: int = DEFAULT_PROJ_DIM,
    ):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"PixelContrastLoss: temperature must be > 0, got {temperature}")
        if queue_size < 0:
            raise ValueError(f"PixelContrastLoss: queue_size must be >= 0 (0 = no memory), got {queue_size}")
        if anchors_per_class < 2:
            raise ValueError(f"PixelContrastLoss: anchors_per_class must be >= 2, got {anchors_per_class}")
        if pixels_per_image < 0:
            raise ValueError(f"PixelContrastLoss: pixels_per_image must be >= 0, got {pixels_per_image}")
        if embed_dim <= 0:
            raise ValueError(f"PixelContrastLoss: embed_dim must be positive, got {embed_dim}")
        self.temperature = float(temperature)
        self.queue_size = int(queue_size)
        self.anchors_per_class = int(anchors_per_class)
        self.pixels_per_image = int(pixels_per_image)
        self.embed_dim = int(embed_dim)
        for kind in ("pixel", "region"):
            self.register_buffer(f"{kind}_queue", torch.zeros(NUM_CLASSES, self.queue_size, self.embed_dim))
            self.register_buffer(f"{kind}_ptr", torch.zeros(NUM_CLASSES, dtype=torch.long))
            self.register_buffer(f"{kind}_count", torch.zeros(NUM_CLASSES, dtype=torch.long))

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, queue_size={self.queue_size}, "
                f"anchors_per_class={self.anchors_per_class}, pixels_per_image={self.pixels_per_image}, "
                f"embed_dim={self.embed_dim}")

    # ------------------------------------------------------------------ loss
    def forward(self, emb0: torch.Tensor, emb1: torch.Tensor, gt_mask0: torch.Tensor, gt_mask1: torch.Tensor,
                pred_mask0: torch.Tensor, pred_mask1: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Inputs:
            emb0, emb1:             [B, P, h, w] L2-normalised embeddings (ProjectionHead output)
            gt_mask0, gt_mask1:     [B, h, w] soft ground truth in [0, 1]; label = gt > 0.5
            pred_mask0, pred_mask1: [B, h, w] predicted repeated-region probability in (0, 1)
            generator:              the only source of randomness (anchor and queue sampling)
        Returns a scalar tensor; the queues are updated afterwards.
        """
        emb, labels, hard = self._flatten(emb0, emb1, gt_mask0, gt_mask1, pred_mask0, pred_mask1)
        anchor_idx, anchor_labels = self.sample_anchors(labels, hard, generator)
        with torch.autocast(device_type=emb.device.type, enabled=False):
            loss = self._info_nce(emb.float(), anchor_idx, anchor_labels)
            # Zero-valued but connected to both inputs, so degenerate batches still give every projection
            # parameter a (zero) gradient, which DDP requires.
            loss = loss + 0.0 * (emb0.float().sum() + emb1.float().sum())
        self.update_queues(emb0, emb1, gt_mask0, gt_mask1, generator)
        return loss

    def _flatten(self, emb0, emb1, gt_mask0, gt_mask1, pred_mask0, pred_mask1):
        if emb0.shape != emb1.shape or emb0.dim() != 4:
            raise ValueError(f"PixelContrastLoss: emb0/emb1 must both be [B, P, h, w], got "
                             f"{tuple(emb0.shape)} and {tuple(emb1.shape)}")
        b, p, h, w = emb0.shape
        if p != self.embed_dim:
            raise ValueError(f"PixelContrastLoss: embeddings have {p} channels but the queues were built for "
                             f"embed_dim={self.embed_dim}")
        for name, m in (("gt_mask0", gt_mask0), ("gt_mask1", gt_mask1),
                        ("pred_mask0", pred_mask0), ("pred_mask1", pred_mask1)):
            if tuple(m.shape) != (b, h, w):
                raise ValueError(f"PixelContrastLoss: {name} must be [B, h, w] = {(b, h, w)} like the "
                                 f"embeddings, got {tuple(m.shape)}")
        # Token order: all of image 0 (pair-major, row-major), then all of image 1.
        emb = torch.cat([emb0, emb1], 0).permute(0, 2, 3, 1).reshape(-1, p)
        labels = (torch.cat([gt_mask0, gt_mask1], 0).detach() > 0.5).reshape(-1).long()
        predicted = (torch.cat([pred_mask0, pred_mask1], 0).detach() > 0.5).reshape(-1).long()
        return emb, labels, predicted != labels

    def sample_anchors(self, labels: torch.Tensor, hard: torch.Tensor, generator: torch.Generator):
        """Per class, up to ``anchors_per_class`` token indices, half hard and half easy.

        labels, hard: [N] over all tokens of the batch. Returns (indices [A], labels [A]) on labels'
        device. When a class has fewer tokens than wanted all of them are taken; when hard (or easy)
        tokens are short, the other kind fills the remainder.
        """
        picked, picked_labels = [], []
        for c in range(NUM_CLASSES):
            of_class = labels == c
            hard_idx = torch.nonzero(of_class & hard).flatten()
            easy_idx = torch.nonzero(of_class & ~hard).flatten()
            n_hard, n_easy = self.split_counts(hard_idx.numel(), easy_idx.numel(), self.anchors_per_class)
            for pool, n in ((hard_idx, n_hard), (easy_idx, n_easy)):
                if n == 0:
                    continue
                order = torch.randperm(pool.numel(), generator=generator, device=generator.device)[:n]
                picked.append(pool[order.to(pool.device)])
                picked_labels.append(torch.full((n,), c, dtype=torch.long, device=labels.device))
        if not picked:
            empty = torch.zeros(0, dtype=torch.long, device=labels.device)
            return empty, empty
        return torch.cat(picked), torch.cat(picked_labels)

    @staticmethod
    def split_counts(num_hard: int, num_easy: int, wanted: int) -> tuple[int, int]:
        """How many hard and easy anchors to take from a class with ``num_hard`` hard and ``num_easy``
        easy tokens: half each, the other kind filling in when one is short, never more than exist."""
        half = wanted // 2
        n_hard = min(num_hard, half)
        n_easy = min(num_easy, wanted - n_hard)
        n_hard = min(num_hard, wanted - n_easy)
        return n_hard, n_easy

    def _memory(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        rows, labels = [], []
        for queue, count in ((self.pixel_queue, self.pixel_count), (self.region_queue, self.region_count)):
            for c in range(NUM_CLASSES):
                n = int(count[c])
                if n:
                    rows.append(queue[c, :n])
                    labels.append(torch.full((n,), c, dtype=torch.long, device=queue.device))
        if not rows:
            return torch.zeros(0, self.embed_dim, device=device), torch.zeros(0, dtype=torch.long, device=device)
        return torch.cat(rows).to(device), torch.cat(labels).to(device)

    def _info_nce(self, emb: torch.Tensor, anchor_idx: torch.Tensor, anchor_labels: torch.Tensor) -> torch.Tensor:
        if anchor_idx.numel() == 0:
            return emb.new_zeros(())
        anchors = emb[anchor_idx]                                    # [A, P]
        memory, memory_labels = self._memory(emb.device)             # [M, P], no grad (buffers)
        contrast = torch.cat([anchors, memory.detach()])             # [A + M, P]
        contrast_labels = torch.cat([anchor_labels, memory_labels])
        logits = anchors @ contrast.T / self.temperature             # [A, A + M]

        num_anchors = anchors.shape[0]
        not_self = torch.ones_like(logits, dtype=torch.bool)
        not_self[:, :num_anchors].fill_diagonal_(False)
        same = anchor_labels[:, None] == contrast_labels[None, :]
        positive = same & not_self
        negative = ~same

        # log-sum-exp over each anchor's negatives; rows without negatives get -inf through a safe
        # branch (logsumexp of an all -inf row has a NaN gradient).
        has_negative = negative.any(1)
        negative_logits = logits.masked_fill(~negative, float("-inf"))
        safe = torch.where(has_negative[:, None], negative_logits, torch.zeros_like(logits))
        no_negative = torch.full_like(has_negative, float("-inf"), dtype=logits.dtype)
        negative_lse = torch.where(has_negative, torch.logsumexp(safe, 1), no_negative)
        log_prob = logits - torch.logaddexp(logits, negative_lse[:, None])   # per (anchor, positive)

        num_positive = positive.sum(1)
        usable = num_positive > 0
        if not usable.any():
            return emb.new_zeros(())
        positive_log_prob = torch.where(positive, log_prob, torch.zeros_like(log_prob))
        per_anchor = -positive_log_prob.sum(1) / num_positive.clamp(min=1)
        return per_anchor[usable].mean()

    # ---------------------------------------------------------------- queues
    @torch.no_grad()
    def update_queues(self, emb0: torch.Tensor, emb1: torch.Tensor, gt_mask0: torch.Tensor,
                      gt_mask1: torch.Tensor, generator: torch.Generator) -> None:
        """Push (detached) pixel and region embeddings of this batch, all-gathered across ranks.

        Public so that a trainer can fill the memory during a warm-up in which the loss is off.
        """
        if self.queue_size == 0:
            return
        emb = torch.cat([emb0, emb1], 0).detach().float()           # [I, P, h, w], I = 2B images
        num_images, p = emb.shape[:2]
        emb = emb.flatten(2).transpose(1, 2)                         # [I, hw, P]
        labels = torch.cat([gt_mask0, gt_mask1], 0).detach().flatten(1) > 0.5   # [I, hw]
        rows, codes = [], []
        for c in range(NUM_CLASSES):
            of_class = labels if c == REPEATED else ~labels
            present = of_class.any(1)
            # Region means: one per (image, class present).
            weights = of_class.float()
            means = torch.bmm(weights[:, None, :], emb).squeeze(1) / weights.sum(1, keepdim=True).clamp(min=1)
            rows.append(F.normalize(means[present], dim=1))
            codes.append(torch.full((int(present.sum()),), 2 * c + 1, device=emb.device))
            # Pixels: up to pixels_per_image random tokens of the class per image, through random keys
            # (tokens outside the class get key -1 so topk picks them last and they are dropped).
            k = min(self.pixels_per_image, labels.shape[1])
            if k:
                keys = torch.rand(labels.shape, generator=generator, device=generator.device).to(emb.device)
                keys = torch.where(of_class, keys, torch.full_like(keys, -1.0))
                top_keys, top_idx = keys.topk(k, dim=1)
                chosen = torch.gather(emb, 1, top_idx[:, :, None].expand(-1, -1, p))   # [I, k, P]
                valid = top_keys >= 0
                rows.append(chosen[valid])
                codes.append(torch.full((int(valid.sum()),), 2 * c, device=emb.device))
        rows_all = torch.cat(rows)
        codes_all = torch.cat(codes).float()
        rows_all, codes_all = _all_gather_rows(rows_all, codes_all)
        for c in range(NUM_CLASSES):
            self._push(self.pixel_queue, self.pixel_ptr, self.pixel_count, c, rows_all[codes_all == 2 * c])
            self._push(self.region_queue, self.region_ptr, self.region_count, c, rows_all[codes_all == 2 * c + 1])

    def _push(self, queue: torch.Tensor, ptr: torch.Tensor, count: torch.Tensor, c: int, rows: torch.Tensor) -> None:
        """FIFO with wrap-around: write at ptr, overwrite the oldest entries first; with more rows than
        slots only the newest queue_size are kept."""
        n = rows.shape[0]
        if n == 0:
            return
        size = self.queue_size
        if n > size:
            rows = rows[-size:]
            n = size
        start = int(ptr[c])
        slots = (start + torch.arange(n, device=queue.device)) % size
        queue[c, slots] = rows.to(queue.device, queue.dtype)
        ptr[c] = (start + n) % size
        count[c] = min(int(count[c]) + n, size)

    def reset_queues(self) -> None:
        for kind in ("pixel", "region"):
            getattr(self, f"{kind}_queue").zero_()
            getattr(self, f"{kind}_ptr").zero_()
            getattr(self, f"{kind}_count").zero_()


def _all_gather_rows(rows: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate ``rows`` [n, P] and ``codes`` [n] from every rank in rank order (identity when
    torch.distributed is not initialised). Ranks may push different numbers of rows, so sizes are
    exchanged first and rows padded to the largest."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return rows, codes
    world = torch.distributed.get_world_size()
    if world == 1:
        return rows, codes
    packed = torch.cat([rows, codes[:, None]], 1).contiguous()   # one collective for rows and codes
    size = torch.tensor([packed.shape[0]], dtype=torch.long, device=packed.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    torch.distributed.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    padded = packed.new_zeros(max(sizes), packed.shape[1])
    padded[:packed.shape[0]] = packed
    gathered = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(gathered, padded)
    out = torch.cat([g[:s] for g, s in zip(gathered, sizes)])
    return out[:, :-1], out[:, -1]


def build_pixel_contrast(cfg: Mapping, in_dim: int) -> tuple[ProjectionHead, PixelContrastLoss]:
    """Projection head and loss from a config mapping with keys among ``proj_dim``, ``temperature``,
    ``queue_size``, ``anchors_per_class``, ``pixels_per_image`` (all optional); unknown keys are errors."""
    known = {"proj_dim", "temperature", "queue_size", "anchors_per_class", "pixels_per_image"}
    unknown = set(cfg) - known
    if unknown:
        raise ValueError(f"pixel contrast: unknown config keys {sorted(unknown)}; known: {sorted(known)}")
    proj_dim = int(cfg.get("proj_dim", DEFAULT_PROJ_DIM))
    head = ProjectionHead(in_dim, proj_dim)
    loss = PixelContrastLoss(
        temperature=float(cfg.get("temperature", DEFAULT_TEMPERATURE)),
        queue_size=int(cfg.get("queue_size", DEFAULT_QUEUE_SIZE)),
        anchors_per_class=int(cfg.get("anchors_per_class", DEFAULT_ANCHORS_PER_CLASS)),
        pixels_per_image=int(cfg.get("pixels_per_image", DEFAULT_PIXELS_PER_IMAGE)),
        embed_dim=proj_dim,
    )
    return head, loss
