"""An mmdlm model as transformers remote code: `AutoConfig`, `AutoModel` and `AutoProcessor` classes.

A folder written by `mmdlm export --format transformers` (`mmdlm.hf_export`) loads with nothing of mmdlm
installed, as LLaDA, Dream and Dimple ship theirs:

    from transformers import AutoModel, AutoProcessor
    model = AutoModel.from_pretrained("runs/my-model-hf", trust_remote_code=True)
    processor = AutoProcessor.from_pretrained("runs/my-model-hf", trust_remote_code=True)
    model.sample(processor, "caption", [image]).texts
    model.sample(processor, "text_to_image", ["a large red circle at the top left"], seed=0).pil()[0]

This is an ordinary mmdlm module (imported and tested in place) and, copied by `mmdlm.hf_export` together with
every mmdlm module it imports as flat files of that folder (their imports made relative), the folder's remote
code: the classes below wrap `mmdlm.model.Transformer`, `mmdlm.processor.MMDLMProcessor` and
`mmdlm.pipeline.MMDLMPipeline` and copy none of their logic.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from mmdlm.model import ModelConfig, RMSNorm, Transformer
from mmdlm.pipeline import MMDLMPipeline
from mmdlm.processor import MMDLMProcessor as FolderProcessor
from mmdlm.sampling.config import SamplerConfig

# the `MMDLMPipeline` methods `MMDLMModel.sample` runs: each takes its inputs, then `sampler=` and `seed=`
TASKS = ("caption", "answer", "text_to_image", "generate_joint", "inpaint", "edit", "infill", "complete_document")
HUB_OPTIONS = ("cache_dir", "force_download", "local_files_only", "revision", "token")  # of `snapshot_download`


class MMDLMConfig(PretrainedConfig):
    """The transformers config of an mmdlm model: the three dicts an mmdlm model folder's config.json records.

    Args:
        model: `mmdlm.model.ModelConfig` as a dict (`dataclasses.asdict`).
        vocab: `mmdlm.vocab.Vocab.to_dict()`: the text and image-code counts the ids follow from.
        layout: `mmdlm.sequence.Layout` as a dict: the fixed text-region lengths of the task templates.
    """

    model_type = "mmdlm"

    def __init__(self, model: dict | None = None, vocab: dict | None = None, layout: dict | None = None,
                 **kwargs: Any) -> None:
        self.model = dict(model or {})
        self.vocab = dict(vocab or {})
        self.layout = dict(layout or {})
        kwargs.setdefault("tie_word_embeddings", False)  # a tied head is the Transformer's own (`tie_head`)
        super().__init__(**kwargs)

    def model_config(self) -> ModelConfig:
        """The `ModelConfig` the Transformer is built from."""
        return ModelConfig(**self.model)


class MMDLMModel(PreTrainedModel):
    """`mmdlm.model.Transformer` as a transformers model: `forward` gives its logits, `sample` runs a task.

    The weights are the Transformer's under `transformer.`; the RoPE tables are not saved (non-persistent
    buffers) and are recomputed when transformers builds the model on the meta device and loads the weights
    (`_init_weights`).
    """

    config_class = MMDLMConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]

    def __init__(self, config: MMDLMConfig) -> None:
        super().__init__(config)
        self.transformer = Transformer(config.model_config())
        self.post_init()

    @classmethod
    def from_mmdlm(cls, transformer: Transformer, processor: FolderProcessor, **config: Any) -> MMDLMModel:
        """Wrap a built Transformer (its own module, weights shared) with the config of `processor`'s vocabulary
        and layout; `config`: more `MMDLMConfig` keyword arguments (`auto_map`, ...)."""
        hf_config = MMDLMConfig(model=asdict(transformer.config), vocab=processor.vocab.to_dict(),
                                layout=asdict(processor.layout), **config)
        with torch.device("meta"):  # a placeholder Transformer, replaced at once: nothing is allocated twice
            model = cls(hf_config)
        model.transformer = transformer
        return model

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        """The Transformer's own initialisation (nanoGPT's), and its RoPE tables recomputed: transformers leaves
        non-persistent buffers uninitialised after loading on the meta device."""
        if isinstance(module, Transformer):
            cos, sin = module.rope_buffers()
            module.rope_cos.copy_(cos)
            module.rope_sin.copy_(sin)
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif hasattr(self, "transformer"):
            self.transformer._init_weights(module)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.transformer.tok_emb

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.transformer.tok_emb = value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                image_index: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                return_dict: bool | None = None, **kwargs: Any) -> MaskedLMOutput | tuple[torch.Tensor]:
        """Logits Float[B, T, V] of the Transformer's call: causal for an AR model, as it was trained otherwise
        (bidirectional; block-causal when `block=` is given).

        Args:
            input_ids: Long[B, T] joint-vocabulary ids (masked positions hold the vocabulary's `<mask>`).
            attention_mask: Long/Bool[B, T], 1 = attended, 0 = padding (mmdlm's `pad` is its negation).
            image_index: Long[B, T], -1 at text positions, else the raster index in the image grid.
            position_ids: Long[B, T] RoPE positions (default 0..T-1).
            kwargs: the Transformer's other keyword arguments (`prefix`, `block`, `causal`, `cache`, ...).
        """
        pad = None if attention_mask is None else attention_mask == 0  # (B, T) True = not attended
        logits = self.transformer(input_ids, pad, image_index, pos=position_ids, **kwargs)  # (B, T, V)
        return_dict = self.config.use_return_dict if return_dict is None else return_dict
        return MaskedLMOutput(logits=logits) if return_dict else (logits,)

    def pipeline(self, processor: FolderProcessor) -> MMDLMPipeline:
        """An `MMDLMPipeline` around this model's Transformer (shared, not copied) and `processor`, on this
        model's device: every task method of mmdlm's pipeline."""
        return MMDLMPipeline(self.transformer, processor, self.device)

    def sample(self, processor: FolderProcessor, task: str, *inputs: Any, sampler: SamplerConfig | None = None,
               seed: int = 0, **options: Any) -> Any:
        """Generate with this model's default sampler for `task` (`MMDLMPipeline`'s method of that name), the
        same tokens as `MMDLMPipeline` gives for the same seed.

        Args:
            processor: the folder's `MMDLMProcessor` (`AutoProcessor.from_pretrained(folder, trust_remote_code=True)`).
            task: one of `TASKS`: "caption" (images), "answer" (images, questions), "text_to_image" (prompts),
                "generate_joint" (n), "inpaint" (images, region_mask), "edit" (images, instructions),
                "infill" (texts with [MASK]), "complete_document" (documents).
            inputs: the task's inputs, in that order; images are PIL images, paths or Float[B, 3, H, W] in [0, 1].
            sampler: a `SamplerConfig` instead of the task's default one.
            seed: the sampling seed (the same seed gives the same output).
            options: the task's other options and `SamplerConfig` fields to override (`steps=8`, ...).

        Returns the pipeline's output: `.texts` (caption, answer, infill), `.images` / `.codes` / `.pil()`
        (text_to_image, inpaint, edit), `.captions` too (generate_joint), `.documents` (complete_document).
        """
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}: the tasks are {', '.join(TASKS)}")
        return getattr(self.pipeline(processor), task)(*inputs, sampler=sampler, seed=seed, **options)


class MMDLMProcessor(FolderProcessor):
    """`mmdlm.processor.MMDLMProcessor` as `AutoProcessor` loads it: the text tokenizer from `text_tokenizer/`,
    the image tokenizer from `vq/` and the layout from config.json."""

    _auto_class: str | None = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> MMDLMProcessor:
        """The processor of an exported folder, or of a Hub repository holding one (downloaded first);
        transformers' other keyword arguments (`trust_remote_code`, ...) are accepted and unused."""
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            hub = {key: kwargs[key] for key in HUB_OPTIONS if key in kwargs}
            folder = Path(snapshot_download(str(pretrained_model_name_or_path), **hub))
        return super().from_pretrained(folder)

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoProcessor") -> None:
        """What `AutoProcessor` calls on a remote-code processor class; it records the auto class."""
        cls._auto_class = auto_class
