//! The `hone` command line: a thin layer that parses arguments, calls the library and prints.

mod cli;

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "hone",
    version,
    about = "A private assistant that keeps learning, on your own device",
    long_about = "hone runs a small quantised language model on this machine, keeps every exchange \
and note in a local SQLite file, and never sends anything anywhere.\n\nData directory: $HONE_HOME, \
else ~/.local/share/hone."
)]
pub struct Cli {
    /// Model to use: a known name (see `hone models`), a registered name, or a path to a .gguf file
    #[arg(long, global = true, env = "HONE_MODEL")]
    pub model: Option<String>,
    /// Compute threads, at most the cores this machine has (default: the cores other processes
    /// leave idle)
    #[arg(short = 't', long, global = true, value_parser = cli::args::threads)]
    pub threads: Option<usize>,
    /// Context length in tokens (default: the model's chat default, at most its trained context)
    #[arg(long, global = true)]
    pub ctx: Option<usize>,
    /// Run the model on this backend
    #[arg(long, global = true, value_enum, default_value_t = DeviceArg::Cpu)]
    pub backend: DeviceArg,
    /// Use this device profile instead of the detected one (see `hone device --list`)
    #[arg(long, global = true, env = "HONE_DEVICE", value_name = "NAME")]
    pub device: Option<String>,
    /// More log output (repeat for more); logs go to stderr
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceArg {
    Cpu,
    Metal,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Pull the default model if needed, store two sample notes, learn them (trains for a few
    /// minutes on a laptop) and answer two questions
    Demo,
    /// Download a known model into the data directory, or register a GGUF file you have
    Pull(PullArgs),
    /// List the known, pulled and registered models
    Models,
    /// Answer one question (to stdout, for scripts)
    Ask(AskArgs),
    /// Talk with the assistant in the terminal
    Chat(ChatArgs),
    /// Keep, import, list and remove notes
    #[command(subcommand)]
    Note(NoteCommand),
    /// Show recent exchanges, newest first
    History(HistoryArgs),
    /// Show the model, the database, counts and sizes
    Status(JsonFlag),
    /// Perplexity of a text file (scored as llama.cpp's llama-perplexity does)
    Perplexity(PerplexityArgs),
    /// When background learning may run: show it (and the decision now) or change it
    #[command(subcommand)]
    Schedule(cli::schedule::ScheduleCommand),
    /// Show the detected device and the profile in use
    Device(cli::schedule::DeviceArgs),
    /// The background learner: run it, see what it does, install it as a login service
    #[command(subcommand)]
    Daemon(cli::daemon::DaemonCommand),
    /// Print the token ids of a text (as llama.cpp's llama-tokenize does)
    Tokenize(TokenizeArgs),
    /// Measure prompt and decode speed and peak memory (like llama-bench)
    Bench(BenchArgs),
    /// Train a LoRA adapter on your data (JSON Lines); the result becomes the active adapter
    Train(cli::train::TrainArgs),
    /// List, choose, roll back and export adapter versions
    #[command(subcommand)]
    Adapters(cli::train::AdaptersCommand),
    /// Learn from your notes now: self-edits, training, gate (one cycle); --log shows past cycles
    Learn(cli::learn::LearnArgs),
    /// The self-edit writer: train it on reward (SEAL), see its log, choose its version
    #[command(subcommand)]
    Writer(cli::writer::WriterCommand),
    /// Measure how well notes are learned (no note in the prompt) and what is forgotten
    Eval(cli::learn::EvalArgs),
    /// Serve the assistant over HTTP (OpenAI-compatible API and a page) on this machine
    Serve(ServeArgs),
    /// Commands for the project's own checks (hidden: not for users)
    #[command(subcommand, hide = true)]
    Dev(cli::dev::DevCommand),
}

#[derive(Args, Debug)]
pub struct JsonFlag {
    /// Print one JSON object
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct PullArgs {
    /// A known model (default: the default model)
    pub name: Option<String>,
    /// Download again even if the file is in place
    #[arg(long)]
    pub force: bool,
    /// Register this GGUF file instead of downloading (needs --name)
    #[arg(long, requires = "register_name")]
    pub file: Option<PathBuf>,
    /// The name to register --file under
    #[arg(long = "name", id = "register_name")]
    pub register_name: Option<String>,
    /// Also make it the default model
    #[arg(long)]
    pub default: bool,
}

#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Most tokens to generate for the answer, at least 1 (default: the model's chat default)
    #[arg(long, short = 'n', value_parser = cli::args::at_least_one)]
    pub max_tokens: Option<usize>,
    /// How adventurous the wording is: 0 always picks the most likely word (the same answer
    /// every time), 0.7 is a usual setting, above 1 gets erratic (default: the model's)
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Choose each word only among the K most likely ones (0 = no limit; default: the model's)
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Choose each word only among the most likely ones that together have this probability,
    /// between 0 (exclusive) and 1 (default: the model's)
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Leave out words less likely than this fraction of the most likely word's probability,
    /// between 0 and 1 (0 = off; default: the model's)
    #[arg(long)]
    pub min_p: Option<f32>,
    /// Make words already used less likely to come again: 1 = no penalty, 1.1 a mild one
    /// (default: the model's)
    #[arg(long)]
    pub repeat_penalty: Option<f32>,
    /// Random seed (default: a fresh one each run; set it to repeat a run)
    #[arg(long)]
    pub seed: Option<u64>,
    /// A system message (default: the model's own)
    #[arg(long)]
    pub system: Option<String>,
}

#[derive(Args, Debug)]
pub struct AskArgs {
    /// The question (words are joined with spaces; "-" reads standard input)
    #[arg(required = true, value_parser = clap::builder::OsStringValueParser::new())]
    pub question: Vec<std::ffi::OsString>,
    /// Print one JSON object (answer, model, adapter, tokens, timings) instead of the text
    #[arg(long)]
    pub json: bool,
    /// Put the most recent notes into the prompt (answer from context, not from memory)
    #[arg(long)]
    pub with_notes: bool,
    /// Do not put the notes the question is about into the prompt (answer from the weights)
    #[arg(long, conflicts_with = "with_notes")]
    pub no_retrieval: bool,
    /// Answer with the base model, without the active adapter
    #[arg(long)]
    pub base: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

#[derive(Args, Debug)]
pub struct ChatArgs {
    /// Chat with the base model, without the active adapter
    #[arg(long)]
    pub base: bool,
    /// Do not put the notes each message is about into the prompt (answer from the weights)
    #[arg(long)]
    pub no_retrieval: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

#[derive(Subcommand, Debug)]
pub enum NoteCommand {
    /// Store a note (words are joined with spaces; "-" reads standard input)
    Add {
        /// The note's text ("-" reads standard input; at most 8 MiB)
        #[arg(required = true, value_parser = clap::builder::OsStringValueParser::new())]
        text: Vec<std::ffi::OsString>,
    },
    /// Import .md/.txt files and folders (recursively); long files are split into sections
    Import {
        /// Files (.md, .markdown, .txt) and folders to import
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Refuse files larger than this many bytes (default 8 MiB)
        #[arg(long)]
        max_file_size: Option<u64>,
    },
    /// List notes, newest first
    List {
        /// How many notes to show (the newest ones), at least 1
        #[arg(short = 'l', long, short_alias = 'n', default_value_t = 20, value_parser = cli::args::at_least_one)]
        limit: usize,
        /// Print one JSON object per note, for scripts
        #[arg(long)]
        json: bool,
        /// List the candidate notes from what you said in chat or through the server, waiting
        /// for `hone note keep ID` or `hone note discard ID`
        #[arg(long)]
        pending: bool,
    },
    /// Replace a note's text: the new text is stored as a new note that supersedes the old one,
    /// which is removed (and what was learned from it forgotten); the new note is learned next
    Edit {
        /// The id of the note to change (see `hone note list`)
        id: i64,
        /// The new text ("-" reads standard input; at most 8 MiB). Without it, $VISUAL or
        /// $EDITOR opens the note when standard input is a terminal
        #[arg(value_parser = clap::builder::OsStringValueParser::new())]
        text: Vec<std::ffi::OsString>,
    },
    /// Keep a candidate note (see `hone note list --pending`) as a note
    Keep {
        /// The candidate's id
        id: i64,
    },
    /// Discard a candidate note (see `hone note list --pending`)
    Discard {
        /// The candidate's id
        id: i64,
    },
    /// Keep candidate notes from what you say without asking (off by default); without an
    /// argument, show the setting
    AutoKeep {
        /// "on" keeps candidates as notes at once; "off" waits for `hone note keep`
        #[arg(value_parser = ["on", "off"])]
        state: Option<String>,
    },
    /// Remove notes by id (all or none: an unknown id removes nothing). A learned note's items
    /// leave the replay of later learning cycles
    Rm {
        /// The ids of the notes to remove (see `hone note list`)
        #[arg(required_unless_present = "source")]
        ids: Vec<i64>,
        /// Also remove every note imported from this file (as `hone note import` named it)
        #[arg(long, value_name = "FILE")]
        source: Option<String>,
    },
}

#[derive(Args, Debug)]
pub struct HistoryArgs {
    /// How many exchanges to show (the most recent ones), at least 1
    #[arg(short = 'l', long, short_alias = 'n', default_value_t = 10, value_parser = cli::args::at_least_one)]
    pub limit: usize,
    /// Print one JSON object per exchange, newest first, for scripts
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct TokenizeArgs {
    /// The text ("-" reads standard input)
    #[arg(required = true, value_parser = clap::builder::OsStringValueParser::new())]
    pub text: Vec<std::ffi::OsString>,
    /// Treat special-token text such as <|im_start|> as plain text
    #[arg(long)]
    pub no_parse_special: bool,
    /// Render this text as a user message with the chat template first
    #[arg(long)]
    pub chat: bool,
    /// Show each token's text too
    #[arg(long)]
    pub pieces: bool,
}

#[derive(Args, Debug)]
pub struct PerplexityArgs {
    /// A UTF-8 text file
    #[arg(long, short = 'f')]
    pub file: PathBuf,
    /// Tokens per chunk (llama-perplexity's -c)
    #[arg(long = "chunk", default_value_t = 512)]
    pub chunk: usize,
    /// Print one JSON object (perplexity, chunks, tokens, timings), for scripts
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Prompt tokens (pp test)
    #[arg(short = 'p', long, default_value_t = 128)]
    pub prompt: usize,
    /// Generated tokens (tg test)
    #[arg(short = 'n', long = "gen", default_value_t = 64)]
    pub gen: usize,
    /// Repetitions (the median is reported)
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Print one JSON object as the last line
    #[arg(long)]
    pub json: bool,
    /// Also run llama.cpp's llama-bench (this path) on the same file, alternating with hone
    /// rep by rep, and print the ratios
    #[arg(long, value_name = "PATH")]
    pub vs_llama_bench: Option<std::path::PathBuf>,
    /// Keep one core busy with another process during the runs (a busy neighbour)
    #[arg(long)]
    pub neighbour: bool,
    /// Measure LoRA training instead (r=8 on every projection of every layer, 4x128 tokens)
    #[arg(long)]
    pub train: bool,
    /// With --train: the memory budget the planner must keep (e.g. 600MiB)
    #[arg(long)]
    pub max_memory: Option<String>,
    /// With --train: write the benchmark's token ids to this JSON file (for bench/peft_train.py)
    #[arg(long)]
    pub data_out: Option<std::path::PathBuf>,
    /// With --train: also train with PyTorch + PEFT (this Python, which must have torch,
    /// transformers, peft and gguf installed) on the same data and LoRA config, alternating
    /// with hone round by round, and print the ratios
    #[arg(long, value_name = "PYTHON")]
    pub vs_peft: Option<std::path::PathBuf>,
    /// With --train: measured rounds (the median is reported; default 5 with --vs-peft, else 1)
    #[arg(long)]
    pub rounds: Option<usize>,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on; anything but loopback needs --api-key
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 picks a free one; the address is printed)
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Clients must send `Authorization: Bearer KEY`
    #[arg(long, env = "HONE_API_KEY", value_name = "KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Answers generated together, in one batch (as llama-server's -np); more requests wait
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub parallel: u16,
    /// Memory for the KV caches of earlier prompts (beyond one per slot), so that a repeated
    /// prompt or a continued conversation does not run again; 0 turns it off
    #[arg(long, default_value = "64MiB", value_name = "SIZE", value_parser = cli::args::bytes)]
    pub prompt_cache: u64,
    /// Seconds a client may leave the server's writes unread before its connection is closed
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600), value_name = "SECS")]
    pub write_timeout: u64,
    /// Largest request body in bytes
    #[arg(long, default_value_t = 1 << 20, hide = true)]
    pub max_body_bytes: usize,
    /// Do not put the notes a chat message is about into the prompt (answer from the weights)
    #[arg(long)]
    pub no_retrieval: bool,
}

fn main() {
    hone::sys::reset_sigpipe();
    let cli = Cli::parse();
    // `hone daemon run` logs to a file in the data directory instead.
    if !matches!(
        cli.command,
        Command::Daemon(cli::daemon::DaemonCommand::Run(_))
    ) {
        cli::logging::init_logging(cli.verbose);
    }
    // Default: the cores other processes leave idle, so a busy machine does not make our
    // threads fight for cores (measured over 30 ms of /proc/stat).
    let cores = hone::sys::available_cpus();
    if let Some(t) = cli.threads.filter(|&t| t > cores) {
        eprintln!(
            "note: -t {t} is more threads than the {cores} cores of this machine; they will share the cores and run slower"
        );
    }
    let threads = cli
        .threads
        .unwrap_or_else(|| hone::sys::idle_cpus(std::time::Duration::from_millis(30)));
    hone::sys::set_threads(threads);
    hone::sys::tune_allocator();
    // The daemon computes on a worker thread while its main thread watches for requests, so
    // its main thread must not be a pool worker (it would take no share of the work).
    // `hone serve` runs the model on a thread of its own, which adopts the pool there.
    if !matches!(cli.command, Command::Daemon(_) | Command::Serve(_)) {
        hone::sys::adopt_compute_pool(threads);
    }
    if let Err(e) = cli::run(cli) {
        eprintln!("error: {}", cli::args::error_report(&e));
        std::process::exit(1);
    }
}
