//! The command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Run LLM fine-tuning pipelines declared in YAML, cached by content.
#[derive(Parser, Debug)]
#[command(name = "anneal", version, about, propagate_version = true)]
pub struct Cli {
    /// More log output (-v: debug, -vv: trace). Also `ANNEAL_LOG=debug`.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Where the pipeline and its store are.
#[derive(Args, Debug, Clone)]
pub struct PipelineArgs {
    /// The pipeline file.
    #[arg(default_value = "anneal.yaml")]
    pub pipeline: PathBuf,
    /// Store directory (default: `store.dir` in the file, else `.anneal` beside it).
    #[arg(long, env = "ANNEAL_STORE", value_name = "DIR")]
    pub store: Option<PathBuf>,
}

/// Which stages.
#[derive(Args, Debug, Clone, Default)]
pub struct Selection {
    /// Only these stages and what they depend on (a fan-out's base name selects every instance).
    #[arg(long = "stage", short = 's', value_name = "STAGE")]
    pub stages: Vec<String>,
    /// Run these stages even if cached.
    #[arg(long, value_name = "STAGE")]
    pub force: Vec<String>,
    /// Run every selected stage even if cached.
    #[arg(long)]
    pub force_all: bool,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the stages that are not up to date.
    Run {
        #[command(flatten)]
        /// Pipeline.
        pipeline: PipelineArgs,
        #[command(flatten)]
        /// Stages.
        select: Selection,
        /// Most stages running at once [default: number of CPUs].
        #[arg(long, short = 'j', value_parser = at_least_one::<usize>)]
        jobs: Option<usize>,
        /// CPUs shared by stages' `resources.cpus` [default: number of CPUs].
        #[arg(long, value_parser = at_least_one::<u32>)]
        cpus: Option<u32>,
        /// GPUs available to stages' `resources.gpus` [default: from CUDA_VISIBLE_DEVICES or /dev/nvidia*].
        #[arg(long)]
        gpus: Option<u32>,
        /// Keep running independent stages after a stage fails.
        #[arg(long, short = 'k')]
        keep_going: bool,
        /// Show the plan and run nothing.
        #[arg(long, short = 'n')]
        dry_run: bool,
        /// Wait for another run holding the store lock instead of exiting.
        #[arg(long)]
        wait: bool,
        /// Print a JSON report on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Show what `run` would do and why.
    Plan {
        #[command(flatten)]
        /// Pipeline.
        pipeline: PipelineArgs,
        #[command(flatten)]
        /// Stages.
        select: Selection,
        /// Print JSON on stdout.
        #[arg(long)]
        json: bool,
        /// Exit with status 1 when any stage would run.
        #[arg(long)]
        check: bool,
    },
    /// Draw the stage graph.
    Dag {
        #[command(flatten)]
        /// Pipeline.
        pipeline: PipelineArgs,
        /// Graphviz dot.
        #[arg(long, conflicts_with = "mermaid")]
        dot: bool,
        /// Mermaid flowchart.
        #[arg(long)]
        mermaid: bool,
    },
    /// Show the last run of every stage.
    Status {
        #[command(flatten)]
        /// Pipeline.
        pipeline: PipelineArgs,
        /// Print JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Compare the metrics stages wrote (e.g. evaluations of phase 1, 2, 3), with deltas.
    Metrics {
        #[command(flatten)]
        /// Pipeline.
        pipeline: PipelineArgs,
        /// Stages to compare, in this order (a fan-out's base name selects every
        /// instance) [default: every stage with a `metrics` output ending in .json].
        #[arg(long = "stage", short = 's', value_name = "STAGE")]
        stages: Vec<String>,
        /// Deltas are against this stage [default: the first one].
        #[arg(long, value_name = "STAGE")]
        baseline: Option<String>,
        /// The output holding each stage's metrics.
        #[arg(long, default_value = "metrics", value_name = "NAME")]
        output: String,
        /// Print JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Remove store objects no kept record points to.
    Gc {
        #[command(flatten)]
        /// Pipeline.
        pipeline: PipelineArgs,
        /// Keep only the newest N records of each stage (the current one is always kept).
        #[arg(long, value_name = "N")]
        keep_last: Option<usize>,
        /// Report what would be removed, remove nothing.
        #[arg(long, short = 'n')]
        dry_run: bool,
        /// Print JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Create, inspect and run models (Hugging Face checkpoints).
    Model {
        /// What to do.
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Run one stage from a job file (`-` for stdin). Used by `anneal run`.
    #[command(hide = true)]
    ExecStage {
        /// The job, as JSON.
        job: PathBuf,
    },
}

/// `anneal model` subcommands.
#[derive(Subcommand, Debug)]
pub enum ModelCommand {
    /// Create a small random-initialised checkpoint with a BPE tokenizer trained on a corpus.
    Init {
        /// Text the tokenizer is trained on (.jsonl/.parquet string fields, or a text file).
        #[arg(long, value_name = "FILE", required = true)]
        corpus: Vec<PathBuf>,
        /// Output directory.
        #[arg(long, short = 'o', value_name = "DIR")]
        out: PathBuf,
        /// Architecture: llama, mistral, qwen2, qwen3, smollm3, gemma2,
        /// gemma3_text, olmo2, olmo3, phi3, or a mixture of experts (4
        /// experts, top 2): qwen2_moe, qwen3_moe, mixtral, olmoe, gpt_oss.
        #[arg(long, default_value = "llama")]
        arch: String,
        /// Size preset: tiny, small or base.
        #[arg(long, default_value = "tiny")]
        size: String,
        /// Tokenizer vocabulary size (default: the preset's).
        #[arg(long)]
        vocab_size: Option<usize>,
        /// Seed of the weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// How the weights are stored: float32 or bfloat16.
        #[arg(long, default_value = "float32")]
        dtype: String,
        /// Print JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Render a conversation with a checkpoint's chat template and tokenize it.
    Template {
        /// The checkpoint directory.
        model: PathBuf,
        /// JSON file with `messages` (and optional `tools`); `-` for stdin.
        #[arg(long, default_value = "-")]
        messages: PathBuf,
        /// End with the assistant turn's opening, as for generation.
        #[arg(long)]
        add_generation_prompt: bool,
        /// Print JSON on stdout (text and token ids).
        #[arg(long)]
        json: bool,
    },
    /// Generate text from a checkpoint.
    Generate {
        /// The checkpoint directory.
        model: PathBuf,
        /// A prompt (repeat for a batch).
        #[arg(long, short = 'p', required = true)]
        prompt: Vec<String>,
        /// Wrap each prompt as a user message in the model's chat template.
        #[arg(long)]
        chat: bool,
        /// Most new tokens per prompt.
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        /// 0 for greedy decoding.
        #[arg(long, default_value_t = 0.0, value_parser = temperature)]
        temperature: f32,
        /// Nucleus sampling threshold.
        #[arg(long, default_value_t = 1.0, value_parser = top_p)]
        top_p: f32,
        /// Sample among the k most likely tokens (0: all).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// Sampling seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Stop string (repeatable).
        #[arg(long)]
        stop: Vec<String>,
        /// Keep generating past end-of-sequence tokens.
        #[arg(long)]
        ignore_eos: bool,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Print JSON on stdout (texts, token ids, timings).
        #[arg(long)]
        json: bool,
    },
}

/// A whole number of at least 1.
fn at_least_one<T: std::str::FromStr + PartialOrd + From<u8>>(s: &str) -> Result<T, String> {
    match s.parse::<T>() {
        Ok(v) if v >= T::from(1) => Ok(v),
        _ => Err(format!("'{s}' is not a whole number of at least 1")),
    }
}

/// A sampling temperature: 0 (greedy) or positive.
fn temperature(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(v) if v >= 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("'{s}' is not 0 (greedy) or a positive number")),
    }
}

/// A nucleus-sampling threshold in (0, 1].
fn top_p(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(v) if v > 0.0 && v <= 1.0 => Ok(v),
        _ => Err(format!("'{s}' is not in (0, 1]")),
    }
}
