"""The config schema: every knob tunelab has, with its default and meaning.

Defaults live here and only here; recipes read typed fields. Unknown keys are errors
(``extra="forbid"``), so a misspelled key never silently falls back to a default.
The README's config reference is written from this file.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from tunelab.config.base import StrictModel
from tunelab.config.classification import ClassificationConfig
from tunelab.config.distributed import DistributedConfig
from tunelab.config.preference import PreferenceConfig
from tunelab.config.rl import RLConfig
from tunelab.config.selection import check_metric_for_best


class ModelConfig(StrictModel):
    """Which pre-trained model to start from and how to load it."""

    name_or_path: str = Field(
        description="Built-in alias (smollm2-135m-instruct, all-minilm-l6-v2), local HF directory, "
        "path to a .gguf file, a hub id written owner/name, or an earlier finished causal-LM tunelab run "
        "directory (stage chaining: its weights, a LoRA run merged into its base)."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for hub ids.")
    trust_remote_code: bool = Field(False, description="Run model code shipped with a hub repo.")
    allow_pickle: bool = Field(
        False, description="Allow loading pickle (.bin) weights; by default only safetensors load."
    )
    attn_implementation: Literal["auto", "sdpa", "sdpa_varlen", "eager", "flash_attention_2", "flex_attention"] = Field(
        "auto",
        description="Attention kernel. 'sdpa_varlen' = tunelab's exact per-example causal attention for packed rows "
        "(no dense block-diagonal mask; falls back to sdpa for padded input and generation). 'auto' = sdpa_varlen "
        "without CUDA, sdpa with CUDA. Other values go to transformers as is.",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Dtype of the loaded weights. 'auto': bfloat16 for a frozen LoRA base on CUDA, else float32. "
        "Trainable parameters (adapters, heads, full FT) are always kept in float32.",
    )
    quantize: Literal["none", "nf4"] = Field(
        "none",
        description="QLoRA (arXiv:2305.14314): store the frozen base's linear layers (not the LM head, norms or "
        "embeddings) as NF4 with double quantization (torchao, CPU and CUDA); LoRA weights stay float32. Needs "
        "train.method lora; not with distributed training (ddp/fsdp) or train.compile.",
    )
    chat_template: str | None = Field(
        None,
        description="Override the tokenizer's chat template: 'chatml', a path to a .jinja file, "
        "or an inline Jinja template. Default: the tokenizer's own template.",
    )
    add_special_tokens: list[str] = Field(
        default_factory=list,
        description="Tokens to add to the vocabulary as special tokens (e.g. ['<tool_call>', '</tool_call>'], task "
        "sft). The embeddings grow by one row each, initialised to the mean of the existing rows, and are "
        "trained; with LoRA the embedding and output head are saved in full as PEFT modules_to_save.",
    )


class DataSource(StrictModel):
    """One dataset: a local file, a built-in packaged dataset, or a hub dataset."""

    path: str = Field(
        description="Local .json/.jsonl/.csv/.parquet file; a folder, a glob ('corpus/**/*.py') or 'package:NAME/GLOB' "
        "(an installed Python package's source tree, e.g. 'package:click/**/*.py') of text files, one plain-text "
        "document per file, held out by file; 'builtin:NAME' (see README); or a hub dataset id."
    )
    name: str | None = Field(None, description="Hub dataset config name, or the built-in dataset's subset.")
    split: str = Field("train", description="Split to read (hub and built-in datasets).")


class DataConfig(StrictModel):
    """What to train on and how examples become tokens."""

    train: DataSource = Field(description="Training data.")
    validation: DataSource | None = Field(
        None, description="Held-out data. If unset, `val_fraction` of train is held out."
    )
    val_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Fraction of train held out when no validation source is given."
    )
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"] = Field(
        "auto", description="Record format; 'auto' detects it from the fields of the first record."
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Map a canonical field (messages, conversations, instruction, input, output, prompt, "
        "completion, text, system) to the column your data uses, e.g. {prompt: question}.",
    )
    system_prompt: str = Field(
        "default",
        description="System prompt of conversations that have none: 'default' keeps what the chat template "
        "writes (SmolLM2's and Qwen2.5's write a default one into every example), 'none' writes none, any other "
        "text is that system prompt. Applied to the chat template, so training and serving (chat, sample "
        "answers, RL prompts, the saved tokenizer) render the same.",
    )
    max_seq_len: int = Field(1024, ge=8, description="Longest example in tokens.")
    overlong: Literal["truncate", "drop"] = Field(
        "truncate",
        description="Examples longer than max_seq_len: 'truncate' keeps the first max_seq_len tokens, "
        "'drop' removes the example. Raw text is cut into chunks instead (see chunk_stride).",
    )
    chunk_stride: int | None = Field(
        None, ge=1,
        description="Raw text (format text, folders/globs of text files): tokens between the starts of consecutive "
        "max_seq_len-token chunks of one document; tokens a chunk shares with the previous one are context only, so "
        "every token is learned once. null = max_seq_len - 1 (chunks share one token). Chunks never cross "
        "documents; chunks with identical token ids are removed and counted.",
    )
    supervise: Literal["assistant", "last_turn", "all"] = Field(
        "assistant",
        description="Which tokens count in the loss: every assistant reply (+ its end-of-turn token), only "
        "the last reply, or every token.",
    )
    packing: bool = Field(
        True,
        description="Pack several examples into each row of up to max_seq_len tokens, with position_ids "
        "restarting per example so none attends across a boundary (no padding).",
    )
    max_examples: int | None = Field(None, ge=1, description="Use only the first N training records.")
    max_validation_examples: int | None = Field(
        None, ge=1, description="Use only the first N records of data.validation (every task; null = all; not "
        "applied to a val_fraction hold-out).",
    )
    shuffle: bool = Field(True, description="Shuffle training examples every epoch (seeded).")

    @field_validator("system_prompt", mode="before")
    @classmethod
    def _null_is_default(cls, value: object) -> object:
        return "default" if value is None else value

    @model_validator(mode="after")
    def _held_out_is_not_train(self) -> DataConfig:
        if self.chunk_stride is not None and self.chunk_stride > self.max_seq_len - 1:
            raise ValueError(f"data.chunk_stride={self.chunk_stride} must be at most data.max_seq_len - 1 = "
                             f"{self.max_seq_len - 1} (a larger stride would skip tokens between chunks)")
        v, t = self.validation, self.train
        if v is not None and (v.path, v.name, v.split) == (t.path, t.name, t.split):
            raise ValueError(
                f"data.validation reads the same data as data.train ({t.path}, name={t.name}, split={t.split}): "
                "held-out metrics would be measured on training data; set data.validation.split (e.g. "
                "validation or test) or use data.val_fraction"
            )
        return self


class LoraConfig(StrictModel):
    """LoRA adapter settings (Hu et al. 2021, arXiv:2106.09685)."""

    r: int = Field(16, ge=1, description="Rank of the update B·A.")
    alpha: float = Field(32.0, gt=0, description="Scaling numerator: the update is scaled by alpha/r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input (0 = no op).")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="'all-linear' (every nn.Linear but the output head) or module-name suffixes, "
        "e.g. [q_proj, v_proj].",
    )
    use_rslora: bool = Field(False, description="Scale by alpha/sqrt(r) (rsLoRA, arXiv:2312.03732).")
    use_dora: bool = Field(
        False,
        description="DoRA (arXiv:2402.09353): also train a magnitude per output feature, W' = m·(W+BA)/||W+BA|| "
        "(norm detached in backward, §4.3). Saved as PEFT does (use_dora, lora_magnitude_vector).",
    )


class TrainConfig(StrictModel):
    """Optimizer, schedule, batching and checkpointing."""

    method: Literal["lora", "full", "freeze"] = Field(
        "lora", description="'lora': train adapters only; 'full': all weights; 'freeze': only `trainable_modules`."
    )
    trainable_modules: list[str] = Field(
        default_factory=list, description="With method=freeze: parameter-name substrings to train."
    )
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored if max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to run; overrides epochs.")
    batch_size: int = Field(1, ge=1, description="Sequences per micro-batch (packed rows when packing).")
    grad_accum: int = Field(8, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not applied to biases, norms, embeddings).")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="LR decay after warmup.")
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="Warmup as a fraction of total steps.")
    warmup_steps: int | None = Field(None, ge=0, description="Warmup steps; overrides warmup_ratio.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm (null = off).")
    seed: int = Field(0, description="Seed for init, shuffling and dropout.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="'auto' = fp32 on CPU, bf16 autocast on GPU with bf16 support."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    compile: bool = Field(
        False,
        description="torch.compile (inductor, dynamic shapes) the forward of every decoder/encoder layer while "
        "training (task sft, classification, reward, dpo). The first step pays the compile (SmolLM2-135M on 2 CPU "
        "cores: 6-33 s extra, less with a warm inductor cache; on CPU a C++ compiler is needed); parameter names and "
        "saved files are unchanged. Measured on CPU: 0.94-1.13x eager speed, no reliable gain; not measured on GPU.",
    )
    cudnn_sdpa: Literal["auto", "on", "off"] = Field(
        "auto",
        description="cuDNN attention kernels for sdpa on CUDA. 'auto' turns them off for LoRA (measured on H200: "
        "3-4 ms of CPU time per call with packed masks, 1.8x slower steps) and leaves them on for full FT.",
    )
    chunked_ce: bool = Field(
        True, description="Compute the LM loss in chunks of tokens so full-vocab logits are never materialized."
    )
    ce_chunk_size: int = Field(1024, ge=16, description="Tokens per cross-entropy chunk.")
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="task=sft: label smoothing ε of the next-token loss, (1-ε)·NLL + ε·mean over the vocabulary "
        "of -log p (Szegedy et al. 2016), summed over supervised tokens and divided by their count in the whole "
        "step (so accumulation and packing leave it unchanged). Held-out loss/perplexity stay the plain NLL.",
    )
    threads: int | None = Field(None, ge=1, description="CPU threads for torch (default: torch's choice).")
    log_every: int = Field(1, ge=1, description="Optimizer steps between metrics lines.")
    eval_every: int | None = Field(None, ge=1, description="Optimizer steps between evaluations (null = end only).")
    save_every: int | None = Field(None, ge=1, description="Optimizer steps between checkpoints (null = end only).")
    keep_last: int = Field(
        2, ge=1, description="Checkpoints kept; older ones are deleted (the best one, with metric_for_best, never)."
    )
    metric_for_best: str | None = Field(
        None,
        description="Held-out metric that picks the best checkpoint; its weights are the ones the run saves, it "
        "is never rotated away and it is recorded in the training state (kept across --resume). sft: "
        "loss|ppl|token_accuracy; dpo: loss|policy/accuracy|policy/margin|policy/accuracy_per_token|"
        "policy/margin_per_token|rewards/accuracy|rewards/margins (preference.loss kto: loss|pairs/policy/accuracy|"
        "pairs/policy/margin|pairs/rewards/accuracy|pairs/rewards/margins); reward: loss|accuracy|margin; classification "
        "single_label: loss|accuracy|macro_f1|weighted_f1|roc_auc, multi_label: loss|subset_accuracy|micro_f1|"
        "macro_f1|roc_auc, regression: loss|mse|mae|r2. loss/ppl/mse/mae are better lower. Needs held-out data, "
        "and with eval_every a save_every that divides it (every evaluated step is saved). null = the final "
        "weights are saved.",
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many evaluations in a row without improving metric_for_best "
        "(null = off). The stopped run is finished: it saves the best weights and cannot be resumed."
    )
    early_stopping_min_delta: float = Field(
        0.0, ge=0.0, description="Smallest change of metric_for_best that counts as an improvement."
    )
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        default_factory=list,
        description="Experiment trackers that get every metrics.jsonl record (numbers; the x axis is the step) and "
        "the resolved config as hyperparameters, offline: tensorboard (output_dir/tensorboard/ event files), wandb "
        "(output_dir/wandb/, offline mode unless WANDB_MODE is set), mlflow (output_dir/mlruns/ file store unless "
        "MLFLOW_TRACKING_URI is set), trackio (its own local store, project tunelab: $TRACKIO_DIR, default ~/.cache/huggingface/trackio). "
        "Each needs its extra, e.g. pip install "
        "'tunelab[tensorboard]'; a missing one is a config error.",
    )

    @field_validator("report_to")
    @classmethod
    def _trackers_installed(cls, value: list[str]) -> list[str]:
        from tunelab.errors import ConfigError
        from tunelab.training.trackers import check_installed

        try:
            check_installed(value)
        except ConfigError as err:
            raise ValueError(str(err).removeprefix("train.report_to: ")) from None
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _best_can_be_saved(self) -> TrainConfig:
        if self.early_stopping_patience is not None and self.metric_for_best is None:
            raise ValueError("train.early_stopping_patience needs train.metric_for_best (the metric to watch)")
        if self.metric_for_best is None or self.eval_every is None:
            return self  # no selection, or only the final evaluation (always saved)
        if self.save_every is None or self.eval_every % self.save_every:
            raise ValueError(
                f"train.metric_for_best={self.metric_for_best} with train.eval_every={self.eval_every} and "
                f"train.save_every={self.save_every}: an evaluated step without a checkpoint could be the best and "
                f"could not be saved; set train.save_every to {self.eval_every} (or a divisor of it)"
            )
        return self


class EvalConfig(StrictModel):
    """What the run reports before and after training."""

    before_training: bool = Field(True, description="Evaluate the starting model before training.")
    sample_questions: int = Field(
        3, ge=0, description="Held-out prompts answered by the starting and fine-tuned model, side by side."
    )
    max_new_tokens: int = Field(
        64, ge=1, description="Generation budget for the side-by-side answers and the next-line eval (tokens)."
    )
    next_line_samples: int = Field(
        0, ge=0,
        description="task=sft on raw text: held-out Python lines scored by next-line exact match before and after "
        "training (given a held-out function's source up to a line, the greedy next line must equal the real one "
        "after stripping whitespace; a fixed sample by hash of file and line). 0 = off.",
    )
    batch_size: int = Field(8, ge=1, description="Sequences per evaluation batch.")


class Config(StrictModel):
    """A whole run. ``task`` says which recipe reads it."""

    task: Literal["sft", "classification", "reward", "dpo", "ppo", "grpo"] = Field(
        "sft", description="Recipe: 'sft' (supervised fine-tuning / continued pre-training), 'classification', "
        "'reward' (Bradley-Terry reward model), 'dpo' (DPO family: dpo, ipo, hinge, simpo, orpo), "
        "'ppo' (RLHF with a reward model), 'grpo' (group-relative RL with programmable rewards)."
    )
    output_dir: str = Field("runs/default", description="Where the trained model, checkpoints and metrics go.")
    model: ModelConfig
    data: DataConfig
    lora: LoraConfig = Field(default_factory=LoraConfig, description="Used when train.method = lora.")
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig, description="Several processes (torchrun): ddp or fsdp, see the README section on several GPUs."
    )
    classification: ClassificationConfig | None = Field(
        None, description="Fields, labels and head of task=classification (required there, only there)."
    )
    preference: PreferenceConfig | None = Field(
        None, description="Loss, reference model and margin of task=reward/dpo (defaults filled in there)."
    )
    rl: RLConfig | None = Field(None, description="Rollouts, rewards and PPO/GRPO knobs of task=ppo/grpo.")

    @model_validator(mode="after")
    def _check_cross_fields(self) -> Config:
        if self.train.method == "freeze" and not self.train.trainable_modules:
            raise ValueError("train.method=freeze needs train.trainable_modules (parameter-name substrings)")
        if self.train.compile and self.task in ("ppo", "grpo"):
            raise ValueError(f"train.compile applies to the training loop of task sft, classification, reward and dpo; "
                             f"task={self.task} has its own rollout loop and does not compile (set train.compile=false)")
        if self.model.add_special_tokens and self.task != "sft":
            raise ValueError(f"model.add_special_tokens is supported for task=sft; task={self.task} would train "
                             "without the new tokens' embeddings (remove the key or use task sft)")
        if self.train.label_smoothing and self.task != "sft":
            raise ValueError(f"train.label_smoothing applies to the next-token loss of task=sft, not task={self.task} "
                             "(task=dpo has preference.label_smoothing)")
        if (self.task == "classification") != (self.classification is not None):
            raise ValueError("task=classification needs a 'classification' section (and only it takes one)")
        check_metric_for_best(self.task, self.train.metric_for_best,
                              self.classification.problem_type if self.classification else None,
                              self.preference.loss if self.preference else None)
        self._check_preference()
        self._check_quantize()
        if self.task in ("ppo", "grpo") or self.rl is not None:
            RLConfig.check_for(self.task, self.rl)
        return self

    def _check_quantize(self) -> None:
        """``model.quantize`` stores a frozen base: LoRA only, one process, eager (what torchao's NF4 path is
        tested for here)."""
        q = self.model.quantize
        if q == "none":
            return
        if self.train.method != "lora":
            raise ValueError(f"model.quantize={q} stores the frozen base quantized; it needs train.method=lora "
                             f"(train.method={self.train.method} trains the base weights themselves)")
        if self.distributed.strategy in ("ddp", "fsdp"):
            raise ValueError(f"model.quantize={q} is not supported with distributed.strategy={self.distributed.strategy} "
                             "(NF4 weights are not sharded or broadcast by tunelab's ddp/fsdp path); train on one "
                             "process or use model.quantize=none")
        if self.train.compile:
            raise ValueError(f"model.quantize={q} is not supported with train.compile=true (torchao's NF4 tensor "
                             "under torch.compile is not tested here); set train.compile=false")

    def _check_preference(self) -> None:
        if self.task not in ("reward", "dpo"):
            if self.preference is not None:
                raise ValueError("the 'preference' section is read only by task=reward and task=dpo")
            return
        if self.preference is None:
            self.preference = PreferenceConfig()
        self.preference.check_against(self.task, self.train.method)
        if self.task == "dpo" and self.preference.loss == "kto" and self.data.packing \
                and "packing" in self.data.model_fields_set:
            raise ValueError("preference.loss=kto batches each example with a mismatched completion and never "
                             "packs; remove data.packing or set it to false")
        if self.data.format != "auto":
            raise ValueError("task=reward/dpo reads prompt/chosen/rejected records; leave data.format at 'auto'")
