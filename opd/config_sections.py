"""The run configuration's sections: one dataclass each, every field documented in its `doc`.

`opd.config` loads, validates and saves them; `opd distill --help-config` prints the docs.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def _f(default, doc: str, *, ge=None, gt=None, le=None, choices=None, factory=None):
    meta = {"doc": doc, "ge": ge, "gt": gt, "le": le, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    teacher: str = _f(
        "embedded",
        "teacher: 'embedded' (SmolLM2-135M-Instruct), a HF folder, a .gguf file, or a served "
        "teacher http://HOST:PORT (vLLM, SGLang or opd serve-teacher); several local ones, "
        "comma-separated, make an ensemble",
    )
    teacher_api: str = _f(
        "auto",
        "served teacher's API: auto (detected), vllm, sglang or opd (log-probs); openai-chat: "
        "a black-box text teacher behind an OpenAI-compatible /v1/chat/completions",
        choices=("auto", "vllm", "sglang", "opd", "openai-chat"),
    )
    teacher_model: str = _f(
        "", "served teacher: the model name to ask for (empty = the server's first model)"
    )
    teacher_tokenizer: str = _f(
        "",
        "served teacher of another tokenizer (cross-tokenizer recipes): a folder holding that "
        "tokenizer, checked against the server; empty = the student's",
    )
    teacher_concurrency: int = _f(4, "served teacher: requests in flight at once", ge=1)
    teacher_batch_tokens: int = _f(
        16384, "served teacher: most tokens (prompt + completion) in one request", ge=1
    )
    teacher_timeout: float = _f(60.0, "served teacher: seconds to wait for one answer", gt=0.0)
    teacher_retries: int = _f(
        4, "served teacher: retries of a failed request (exponential backoff)", ge=0
    )
    teacher_token_env: str = _f(
        "",
        "served teacher: name of the environment variable holding a bearer token (the token "
        "itself is never written anywhere)",
    )
    teacher_weights: str = _f("", "ensemble weights, comma-separated (e.g. 0.7,0.3); empty = equal")
    student: str = _f(
        "", "student: a HF folder or .gguf file; empty = a depth-pruned copy of the teacher"
    )
    student_layers: int = _f(15, "layers kept when the student is pruned from the teacher", ge=1)
    student_prune_to: int = _f(
        0,
        "prune the given model.student to this many evenly spaced layers after loading "
        "(0 = keep all); e.g. with a served teacher: model.student=embedded "
        "model.student_prune_to=15",
        ge=0,
    )
    dtype: str = _f(
        "float32", "parameter dtype of both models", choices=("float32", "bfloat16", "float16")
    )
    device: str = _f("auto", "'auto' (cuda if available), 'cpu' or 'cuda[:i]'")
    allow_download: bool = _f(
        False,
        "download a teacher/student given as a Hugging Face Hub id (org/name) when it is not "
        "in the local Hugging Face cache (HF_HUB_CACHE or HF_HOME); false = cache only",
    )
    # --- LoRA (opd.models.lora; issue 13 item 3) ---
    lora_r: int = _f(0, "LoRA rank of the student's adapters (peft); 0 = full fine-tuning", ge=0)
    lora_alpha: float = _f(16.0, "LoRA scaling numerator: updates are scaled by alpha / r", gt=0.0)
    lora_targets: str = _f(
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        "comma-separated module names that get LoRA adapters (default: attention + MLP)",
    )
    lora_dropout: float = _f(0.0, "dropout on the LoRA adapters' input", ge=0.0, le=0.9)


@dataclass
class DataConfig:
    train: str = _f(
        "task:arithmetic",
        "training prompts: a .jsonl/.json/.csv/.parquet file, a datasets save_to_disk "
        "folder (DIR or DIR:SPLIT), hf:ORG/NAME:SPLIT, or 'task:NAME[:split]'",
    )
    eval: str = _f(
        "",
        "held-out prompts (same forms); empty = follow data.train: a shipped task's test "
        "split, else rows held out from data.train (see docs/data.md)",
    )
    eval_count: int = _f(
        32, "number of held-out prompts used for evaluation (0 = no evaluation)", ge=0
    )
    max_prompt_tokens: int = _f(256, "prompts longer than this are truncated or rejected", ge=1)
    truncation: str = _f(
        "left",
        "over-long prompts: 'left' (keep the end, count) or 'error'",
        choices=("left", "error"),
    )
    chat_template: str = _f(
        "auto",
        "use the tokenizer's chat template: auto, true or false",
        choices=("auto", "true", "false"),
    )
    system_prompt: str = _f("", "system message prepended to chat prompts (empty = none)")
    skip_bad_rows: bool = _f(False, "skip and count malformed rows instead of stopping")
    allow_download: bool = _f(
        False, "allow data.train/data.eval=hf:ORG/NAME:SPLIT to download from the Hugging Face Hub"
    )


@dataclass
class SamplingConfig:
    max_new_tokens: int = _f(32, "longest completion, in tokens", ge=1)
    temperature: float = _f(1.0, "sampling temperature of rollouts (0 = greedy)", ge=0.0)
    top_p: float = _f(1.0, "nucleus sampling mass (1 = off)", gt=0.0, le=1.0)
    top_k: int = _f(0, "sample from the k most likely tokens only (0 = off)", ge=0)
    backend: str = _f(
        "auto",
        "'auto' (lean static-cache decoding for Llama-family models, else Hugging Face "
        "generate), 'fast' (the lean loop or an error), 'hf' (generate, the reference) or "
        "'vllm' (a vLLM engine holding a copy of the student; pip install 'opd[vllm]')",
        choices=("auto", "fast", "hf", "vllm"),
    )
    vllm_sync_every: int = _f(
        1,
        "sampling.backend=vllm: push the student's weights to the engine every N optimizer "
        "steps (the engine's staleness is logged as vllm_weight_lag)",
        ge=1,
    )
    vllm_gpu_memory: float = _f(
        0.4,
        "sampling.backend=vllm: fraction of the GPU memory the engine may take (weights + KV "
        "cache); on CPU, VLLM_CPU_KVCACHE_SPACE (GiB) sizes the cache instead",
        gt=0.0,
        le=1.0,
    )


@dataclass
class MethodConfig:
    recipe: str = _f("on_policy_rkl", "recipe name, see `opd recipes`")
    args: dict = _f(None, "recipe arguments, e.g. {beta: 0.5}", factory=dict)


@dataclass
class TrainConfig:
    steps: int = _f(60, "optimizer steps", ge=1)
    epochs: float = _f(
        0.0, "passes over the training prompts; > 0 sets train.steps (0 = use train.steps)", ge=0.0
    )
    batch_size: int = _f(8, "prompts per micro-batch", ge=1)
    grad_accum: int = _f(1, "micro-batches per optimizer step", ge=1)
    lr: float = _f(5e-5, "peak learning rate (AdamW)", gt=0.0)
    weight_decay: float = _f(0.0, "AdamW weight decay", ge=0.0)
    warmup_steps: int = _f(0, "linear warm-up steps before the cosine decay", ge=0)
    min_lr_ratio: float = _f(0.1, "cosine decays to this fraction of lr", ge=0.0, le=1.0)
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 = off)", ge=0.0)
    seed: int = _f(0, "seed for data order, sampling and initialisation")
    eval_every: int = _f(0, "evaluate held-out KL every N steps (0 = only before/after)", ge=0)
    checkpoint_every: int = _f(
        50, "save a checkpoint every N steps (0 = off; also at the end and on Ctrl-C)", ge=0
    )
    keep_checkpoints: int = _f(2, "how many recent checkpoints to keep", ge=1)
    # 256 rows × V=49,152 × 4 B = 50 MB per logits block. At N=4,096 the chunked peak is
    # about ⅐ of the materialized one with 512-row chunks, ¼ with 1024
    # (benchmarks/results_chunked.md); 256 rows cut the speed benchmark's peak at V=49,152
    # from 851 to 519 MB at the same step time (benchmarks/results_speed.md).
    chunk_size: int = _f(256, "rows per chunk in the memory-lean divergence", ge=1)
    loss_path: str = _f(
        "chunked",
        "'chunked' (memory-lean) or 'materialized' (reference)",
        choices=("chunked", "materialized"),
    )
    threads: int = _f(0, "torch CPU threads (0 = torch default)", ge=0)
    progress: bool = _f(True, "show a progress bar")
    log_to: str = _f(
        "",
        "experiment trackers mirroring metrics.jsonl, comma-separated: tensorboard, wandb, "
        "mlflow (empty = none); see docs/tracking.md",
    )
    sample_every: int = _f(
        0,
        "every N steps, write held-out prompts with student and teacher greedy completions "
        "to samples.jsonl and the trackers (0 = off)",
        ge=0,
    )
    sample_count: int = _f(3, "held-out prompts per sample point (train.sample_every)", ge=1)
    checkpoint_minutes: float = _f(
        10.0,
        "also save a checkpoint when this many minutes passed since the last (0 = off)",
        ge=0.0,
    )
    # --- mixed precision and gradient checkpointing (opd.precision; issue 13 items 2, 3) ---
    precision: str = _f(
        "fp32",
        "fp32, or bf16: autocast the student's forward/backward, the teacher and the rollouts "
        "in bfloat16 over float32 weights and optimizer state (needs model.dtype=float32)",
        choices=("fp32", "bf16"),
    )
    bf16_logits: bool = _f(
        False,
        "with precision=bf16: project the heads (the loss's logits, student and teacher) in "
        "bfloat16 too; faster, but the logits then carry ~0.4 % relative error (the demo's "
        "held-out KL after 30 steps, 3 seeds: 2.13 vs 1.66 with float32 logits; docs/scale.md)",
    )
    gradient_checkpointing: bool = _f(
        False, "recompute each decoder layer's activations in the backward (less memory)"
    )
    # --- the asynchronous rollout pipeline (opd.pipeline; issue 13 item 5) ---
    async_rollouts: int = _f(
        0,
        "write the rollouts and teacher scores of step s+k in a background thread while step "
        "s trains, from a copy of the student k steps old (logged: policy_lag); 0 = "
        "synchronous",
        ge=0,
    )
    async_correction: bool = _f(
        False,
        "with train.async_rollouts > 0: weight each token by min(pi_student / pi_generator, "
        "train.async_correction_clip) (truncated importance sampling)",
    )
    async_correction_clip: float = _f(
        2.0, "the largest importance weight of train.async_correction", gt=0.0
    )
    # --- fully sharded students (opd.fsdp; issue 13 item 1) ---
    fsdp: bool = _f(
        False,
        "under torchrun with N > 1 processes: shard the student's weights, gradients and AdamW "
        "state over the processes (FSDP2) instead of replicating it (DDP); see "
        "docs/distributed.md",
    )


@dataclass
class RunConfig:
    output_dir: str = _f("", "run folder; empty = runs/<recipe>-<timestamp>")
    model: ModelConfig = _f(None, "models", factory=ModelConfig)
    data: DataConfig = _f(None, "prompt sets", factory=DataConfig)
    sampling: SamplingConfig = _f(None, "rollout sampling", factory=SamplingConfig)
    method: MethodConfig = _f(None, "the distillation method", factory=MethodConfig)
    train: TrainConfig = _f(None, "optimisation", factory=TrainConfig)
