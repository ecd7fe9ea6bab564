"""The joint token layout of mmdlm: the one place where token-id arithmetic lives.

One shared vocabulary for text and images, as in UniDisc / MMaDA / Show-o:

    [0, text_size)                          text tokens (from the text tokenizer)
    [text_size, text_size + codebook_size)  image codes (from the VQ tokenizer), shifted by `image_offset`
    [text_size + codebook_size, size)       special tokens, in the order of `SPECIALS`

The mask id is a special, so it is never inside the codebook range (nor the text range).
Generation at an image position may only pick image codes; at a text position only text ids and
`<eos>` (modality-restricted logits, see `allowed`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch

# Order matters: a special's id is `special_offset + SPECIALS.index(name)`.
SPECIALS: tuple[str, ...] = (
    "<pad>",  # padding; never attended to, never a target
    "<bos>",  # start of a text-only sequence
    "<eos>",  # end of text; also fills the unused tail of fixed-length answer regions (LLaDA)
    "<mask>",  # the absorbing state of masked diffusion
    "<soi>",  # start of image
    "<eoi>",  # end of image
    "<sep>",  # between a question and its answer
    "<t2i>",  # task: text-to-image
    "<mmu>",  # task: multimodal understanding (captioning, VQA)
    "<joint>",  # task: joint image + caption generation
    "<text>",  # task: text-only masked-diffusion LM (infilling)
)


class Modality(IntEnum):
    """What a position holds; decides which ids the sampler may put there."""

    TEXT = 0
    IMAGE = 1


@dataclass(frozen=True)
class Vocab:
    """The joint vocabulary built from the two tokenizers' sizes.

    Args:
        text_size: number of text ids (the text tokenizer's vocab size).
        codebook_size: number of VQ codes (the image tokenizer's codebook size).
    """

    text_size: int
    codebook_size: int

    def __post_init__(self) -> None:
        if self.text_size <= 0 or self.codebook_size <= 0:
            raise ValueError(
                f"Vocab needs positive sizes, got text_size={self.text_size}, "
                f"codebook_size={self.codebook_size}"
            )

    # ---- ranges ---------------------------------------------------------------------------------
    @property
    def image_offset(self) -> int:
        """Token id of image code 0."""
        return self.text_size

    @property
    def special_offset(self) -> int:
        """Token id of the first special (`<pad>`)."""
        return self.text_size + self.codebook_size

    @property
    def size(self) -> int:
        """Total number of ids: the model's embedding / output size."""
        return self.special_offset + len(SPECIALS)

    def special(self, name: str) -> int:
        """Id of a special token by name, e.g. `vocab.special("<mask>")`."""
        try:
            return self.special_offset + SPECIALS.index(name)
        except ValueError:
            raise KeyError(f"unknown special token {name!r}; known: {', '.join(SPECIALS)}") from None

    @property
    def pad(self) -> int:
        return self.special("<pad>")

    @property
    def bos(self) -> int:
        return self.special("<bos>")

    @property
    def eos(self) -> int:
        return self.special("<eos>")

    @property
    def mask(self) -> int:
        return self.special("<mask>")

    @property
    def soi(self) -> int:
        return self.special("<soi>")

    @property
    def eoi(self) -> int:
        return self.special("<eoi>")

    @property
    def sep(self) -> int:
        return self.special("<sep>")

    @property
    def t2i(self) -> int:
        return self.special("<t2i>")

    @property
    def mmu(self) -> int:
        return self.special("<mmu>")

    @property
    def joint(self) -> int:
        return self.special("<joint>")

    @property
    def text_task(self) -> int:
        return self.special("<text>")

    # ---- image codes <-> token ids ----------------------------------------------------------------
    def image_to_token(self, codes: torch.Tensor) -> torch.Tensor:
        """VQ code indices (any shape, values in [0, K)) -> token ids."""
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"image codes must lie in [0, {self.codebook_size}), got "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        return codes.long() + self.image_offset

    def token_to_image(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (all inside the image range) -> VQ code indices."""
        if ids.numel() and not bool(self.is_image(ids).all()):
            raise ValueError("token_to_image got ids outside the image-code range "
                             f"[{self.image_offset}, {self.special_offset})")
        return ids.long() - self.image_offset

    # ---- predicates -----------------------------------------------------------------------------
    def uniform_tokens(self, u: torch.Tensor, is_image: torch.Tensor) -> torch.Tensor:
        """Long like `u`: the ids that uniforms `u` (Float in [0, 1)) pick uniformly within each position's
        modality: an image code where `is_image` (Bool), a text id (never a special) elsewhere."""
        text = (u * self.text_size).long().clamp(max=self.text_size - 1)
        image = self.image_offset + (u * self.codebook_size).long().clamp(max=self.codebook_size - 1)
        return torch.where(is_image, image, text)

    def is_text(self, ids: torch.Tensor) -> torch.Tensor:
        return ids < self.text_size

    def is_image(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.image_offset) & (ids < self.special_offset)

    def is_special(self, ids: torch.Tensor) -> torch.Tensor:
        return ids >= self.special_offset

    def text_ids_only(self, ids: list[int] | torch.Tensor) -> list[int]:
        """Keep the text ids of a sequence up to its first `<eos>` (what a text decoder wants)."""
        out: list[int] = []
        for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids):
            if i == self.eos:
                break
            if 0 <= i < self.text_size:
                out.append(int(i))
        return out

    # ---- modality-restricted logits ---------------------------------------------------------------
    def allowed(self, modality: Modality, device: torch.device | str | None = None) -> torch.Tensor:
        """Bool[size]: the ids generation may place at a position of this modality."""
        allowed = torch.zeros(self.size, dtype=torch.bool, device=device)
        if modality == Modality.IMAGE:
            allowed[self.image_offset : self.special_offset] = True
        else:
            allowed[: self.text_size] = True
            allowed[self.eos] = True
        return allowed

    def allowed_table(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Bool[len(Modality), size]: row m is `allowed(Modality(m))`; index it by a modality tensor."""
        return torch.stack([self.allowed(m, device) for m in Modality])

    def to_dict(self) -> dict[str, int]:
        return {"text_size": self.text_size, "codebook_size": self.codebook_size}
