//! The `sensorium-ingest` command line: a thin layer over the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use sensorium_ingest::commands::convert::{
    self, parse_size, ConvertOptions, ConvertReport, FinalizeOptions, Finalized, Request, RunPlan,
    Shard, ShardArg, ShardReport,
};
use sensorium_ingest::commands::ingest::{self, IngestReport};
use sensorium_ingest::commands::inspect;
use sensorium_ingest::commands::verify::{self, VerifyReport};
use sensorium_ingest::disk::human;
use sensorium_ingest::executor::name_lock::Waiting;
use sensorium_ingest::pipeline::embedded::{self, PipelineChoice};
use sensorium_ingest::pipeline::spec::Pipeline;
use sensorium_ingest::progress::ProgressMode;
use sensorium_ingest::source::Source;
use sensorium_ingest::writers::bucket::StoreLocation;
use sensorium_ingest::Error;

/// mimalloc keeps freed pages for reuse: with glibc malloc, the shards' and zstd's multi-MB
/// buffers were mapped and unmapped again and again (page faults; docs/performance.md,
/// "mimalloc, purge policy per command").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "sensorium-ingest",
    version,
    about = "Convert Sensorium 2023 mouse datasets into Zarr v3 arrays and Parquet tables"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format on stderr: `text`, or `json` (one event per line, for cluster log tools).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Less output: errors only, no progress.
    #[arg(short, long, global = true)]
    quiet: bool,
    /// More output (-v: stage events even on a terminal, -vv: debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Seconds between progress lines when stderr is not a terminal.
    #[arg(long, global = true, default_value_t = 10.0, value_name = "SECONDS")]
    progress_interval: f64,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// What `convert` and `plan` work on.
#[derive(clap::Args)]
struct Target {
    /// The mouse's zip archive or extracted folder.
    source: PathBuf,
    /// The store: a folder, or a bucket URL (s3://bucket/prefix, gs://, az://); the dataset
    /// is written to STORE/<name>/.
    #[arg(long = "out", value_name = "STORE", value_parser = parse_store)]
    out: StoreLocation,
    /// Pipeline: `auto` (the embedded pipeline that fits the source, named in `plan` and
    /// `inspect`), the name of an embedded pipeline (sensorium2023, sensorium2022), or a file.
    #[arg(long, value_name = "auto|NAME|FILE", default_value = "auto")]
    pipeline: String,
    /// Dataset name; default: the source's name without `-<Stimulus>-<32 hex>`.
    #[arg(long)]
    name: Option<String>,
    /// Rerun every stage; replace a dataset converted from another source.
    #[arg(long)]
    force: bool,
}

impl Target {
    fn options(
        self,
        threads: Option<usize>,
        resources: &ResourceArgs,
        writing: &WriteArgs,
        progress: ProgressMode,
    ) -> Result<ConvertOptions, Error> {
        Request {
            source: self.source,
            store: self.out,
            name: self.name,
            pipeline: PipelineChoice::from_argument(&self.pipeline)?,
            force: self.force,
            threads,
            max_memory: resources.max_memory,
            direct_io: !resources.no_direct_io,
            progress,
            wait: writing.waiting(),
            no_space_check: writing.no_space_check,
        }
        .options()
    }
}

/// How a writer meets others and the disk.
#[derive(clap::Args, Default)]
struct WriteArgs {
    /// When another writer holds the dataset's name, wait for it (at most DURATION: 90s, 10m,
    /// 2h) instead of exiting 75 at once.
    #[arg(long, value_name = "DURATION", num_args = 0..=1, require_equals = true,
          default_missing_value = "forever", value_parser = parse_wait)]
    wait: Option<WaitLimit>,
    /// Start even when the store's file system seems to lack the space the run needs.
    #[arg(long)]
    no_space_check: bool,
}

impl WriteArgs {
    fn waiting(&self) -> Waiting {
        match self.wait {
            None => Waiting::No,
            Some(WaitLimit(limit)) => Waiting::Up(limit),
        }
    }
}

fn parse_store(text: &str) -> Result<StoreLocation, String> {
    StoreLocation::parse(text).map_err(|e| e.to_string().replace("\n  hint:", "; hint:"))
}

/// How long `--wait` waits: `None` for as long as it takes.
#[derive(Clone, Copy)]
struct WaitLimit(Option<Duration>);

/// `forever`, or a duration: a number of seconds, or with `s`, `m` or `h`.
fn parse_wait(text: &str) -> Result<WaitLimit, String> {
    if text == "forever" {
        return Ok(WaitLimit(None));
    }
    let (number, unit) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&text[..i], c),
        _ => (text, 's'),
    };
    let scale = match unit {
        's' => 1.0,
        'm' => 60.0,
        'h' => 3600.0,
        _ => return Err(format!("unknown unit in {text:?}: use s, m or h")),
    };
    number
        .parse::<f64>()
        .ok()
        .filter(|n| n.is_finite() && *n >= 0.0)
        .map(|n| WaitLimit(Some(Duration::from_secs_f64(n * scale))))
        .ok_or_else(|| format!("{text:?} is not a duration like 90s, 10m or 2h"))
}

#[derive(clap::Args)]
struct ResourceArgs {
    /// Memory the run must fit in, e.g. 4G (K/M/G/T are powers of 1024, as SLURM's --mem):
    /// fewer threads are used if needed. Default: the cgroup's or SLURM's limit, if any.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_memory: Option<u64>,
    /// Write shards through the page cache instead of with direct I/O (O_DIRECT). Direct I/O
    /// is used only where the file system takes it; see docs/operations.md.
    #[arg(long)]
    no_direct_io: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Convert one mouse (a zip archive, read in place, or its extracted folder) into STORE/<name>/.
    #[command(
        after_help = "Examples:\n  sensorium-ingest convert dynamic29515-10-12-Video-9b4f6a1a067fe51e15306b9628efea20.zip --out store/\n  sensorium-ingest convert extracted/dynamic29515-10-12/ --out store/ --pipeline my.yaml --threads 8"
    )]
    Convert(ConvertArgs),
    /// Finish a sharded conversion: check every part's receipt, write the tables, manifest and
    /// lock, and publish STORE/NAME (identical to a single-process conversion).
    #[command(
        after_help = "Examples:\n  # three tasks (any machines sharing the store), then one finalize:\n  sensorium-ingest convert mouse.zip --out store/ --shard 0/3\n  sensorium-ingest convert mouse.zip --out store/ --shard 1/3\n  sensorium-ingest convert mouse.zip --out store/ --shard 2/3\n  sensorium-ingest finalize store/mouse\n\nExit status: 0 when published (or already complete), 75 when parts are missing or damaged\n(each is named: resubmit those tasks and finalize again), 65 when the source changed."
    )]
    Finalize(FinalizeArgs),
    /// Show each stage of a conversion and whether it would run or be reused, and why.
    #[command(
        after_help = "Example:\n  sensorium-ingest plan mouse.zip --out store/ --pipeline edited.yaml"
    )]
    Plan {
        #[command(flatten)]
        target: Target,
    },
    /// Convert every mouse in INBOX that the store does not have yet (for a timer to run).
    #[command(
        after_help = "Examples:\n  sensorium-ingest ingest /data/inbox --out /data/store\n  # cron, every 15 minutes:\n  */15 * * * *  sensorium-ingest -q ingest /data/inbox --out /data/store\n\nSources are recognised by their content fingerprint, not their file name. Files still being\nwritten are left for the next run. Exit status: 0 when nothing failed, 1 when a source failed\n(the others are still converted), 75 when another ingest holds the store."
    )]
    Ingest(IngestArgs),
    /// Re-read datasets through the real decoders and compare with their recorded checksums.
    #[command(
        after_help = "Examples:\n  sensorium-ingest verify store/dynamic29515-10-12\n  sensorium-ingest verify store/            # every dataset in the store\n  sensorium-ingest verify store/dynamic29515-10-12 --against dynamic29515-10-12-Video-9b4f6a1a067fe51e15306b9628efea20.zip\n\nExit status: 0 when everything matches, 1 when something does not (each bad file is named)."
    )]
    Verify {
        /// STORE/NAME, or STORE for every dataset in it (a folder or a bucket URL).
        path: String,
        /// Also compare with the source archive or folder (one dataset only).
        #[arg(long, value_name = "SOURCE")]
        against: Option<PathBuf>,
    },
    /// Describe a source before converting it: name, trials per tier, N, T, dtypes, junk.
    Inspect {
        source: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[arg(long, value_name = "auto|NAME|FILE", default_value = "auto")]
        pipeline: String,
    },
    /// Print an embedded pipeline (a starting point for your own): the 2023 default, or NAME.
    DefaultPipeline {
        /// sensorium2023 or sensorium2022.
        #[arg(default_value = "sensorium2023")]
        name: String,
    },
    /// Print the JSON Schema of pipeline files (schemas/pipeline.schema.json).
    PipelineSchema,
    /// Print a shell completion script.
    #[command(
        after_help = "Examples:\n  sensorium-ingest completions bash > /etc/bash_completion.d/sensorium-ingest\n  sensorium-ingest completions zsh > \"${fpath[1]}/_sensorium-ingest\"\n  sensorium-ingest completions fish > ~/.config/fish/completions/sensorium-ingest.fish"
    )]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

// The arguments of the commands with many, in structs of their own so that each command's
// function takes one value. Plain comments: a doc comment here would become help text.

#[derive(clap::Args)]
struct ConvertArgs {
    #[command(flatten)]
    target: Target,
    /// Worker threads (default: every core the process may use, at most
    /// SLURM_CPUS_PER_TASK). Output is identical for any value.
    #[arg(long)]
    threads: Option<usize>,
    #[command(flatten)]
    resources: ResourceArgs,
    #[command(flatten)]
    writing: WriteArgs,
    /// Show what would run and why, write nothing (same as `plan`).
    #[arg(long)]
    dry_run: bool,
    /// Convert only part K (0-based) of N of the trial arrays, for a job array; then run
    /// `finalize STORE/NAME` once every part is done. `auto`: K and N from a SLURM job array;
    /// `auto/N`: K from SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX (Kubernetes).
    #[arg(long, value_name = "K/N|auto|auto/N")]
    shard: Option<ShardArg>,
}

#[derive(clap::Args)]
struct FinalizeArgs {
    /// STORE/NAME, the dataset the parts belong to.
    dataset: PathBuf,
    /// The source, when it is not where the first task found it.
    #[arg(long, value_name = "SOURCE")]
    source: Option<PathBuf>,
    #[arg(long)]
    threads: Option<usize>,
    #[command(flatten)]
    resources: ResourceArgs,
    #[command(flatten)]
    writing: WriteArgs,
}

#[derive(clap::Args)]
struct IngestArgs {
    /// Folder of mouse archives (*.zip) or extracted folders.
    inbox: PathBuf,
    /// The store: a folder, or a bucket URL (s3://bucket/prefix).
    #[arg(long = "out", value_name = "STORE", value_parser = parse_store)]
    out: StoreLocation,
    /// `auto` picks the embedded pipeline for each source by its content.
    #[arg(long, value_name = "auto|NAME|FILE", default_value = "auto")]
    pipeline: String,
    #[arg(long)]
    threads: Option<usize>,
    #[command(flatten)]
    resources: ResourceArgs,
    /// Leave sources modified less than this many seconds ago for the next run.
    #[arg(long, default_value_t = 120, value_name = "SECONDS")]
    min_age: u64,
    /// Seconds between two looks at the inbox; what changed in between is left for later.
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS")]
    settle: f64,
    /// Start each conversion even when the store's file system seems to lack the space it needs.
    #[arg(long)]
    no_space_check: bool,
}

/// Like `println!`, but a closed stdout (`... | head`) is not a panic: output is best effort.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// Like `print!`, with the same tolerance as `out!`.
macro_rules! outp {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// The header line, then one line per stage (scripts read the stage lines by position).
fn print_plan(plan: &RunPlan) {
    let mib = |b: u64| b.div_ceil(1 << 20);
    let resources = match &plan.threads {
        _ if plan.up_to_date => " (up to date)".to_string(),
        None => String::new(),
        Some(c) => format!(
            "; {} thread{}, memory at most ~{} MiB ({})",
            c.threads,
            if c.threads == 1 { "" } else { "s" },
            mib(c.estimate_bytes),
            match &c.limit {
                Some(l) => format!("limit {} MiB: {}", mib(l.bytes), l.origin),
                None => "no memory limit found".into(),
            }
        ),
    };
    let disk = match (plan.up_to_date, plan.space_free) {
        (true, _) => String::new(),
        (false, Some(free)) => format!(
            "; disk: needs ~{} of {} free",
            human(plan.space_needed),
            human(free)
        ),
        (false, None) => format!("; disk: needs ~{}", human(plan.space_needed)),
    };
    out!(
        "{} -> {} (pipeline {}: {}){disk}{resources}",
        plan.dataset,
        plan.dataset_dir.display(),
        plan.pipeline,
        plan.pipeline_file
    );
    for s in &plan.stages {
        out!(
            "  {:<14} {:<12} {:<5} {:<38} [{} -> {}]",
            s.id,
            s.kind,
            if s.run { "run" } else { "skip" },
            s.reason,
            s.reads.join(" + "),
            s.writes
        );
    }
}

fn print_report(verb: &str, report: &ConvertReport) {
    let mb = |b: u64| b as f64 / 1e6;
    out!(
                "{verb} {} ({} trials) -> {}\n  input {:.1} MB, output {:.1} MB (ratio {:.2}), {:.1} s, {:.1} MB/s, {} thread{}{}",
                report.dataset,
                report.trials,
                report.dataset_dir.display(),
                mb(report.source_bytes),
                mb(report.output_bytes),
                report.source_bytes as f64 / report.output_bytes.max(1) as f64,
                report.seconds,
                mb(report.stages.iter().map(|s| s.bytes).sum()) / report.seconds.max(1e-9),
                report.threads,
                if report.threads == 1 { "" } else { "s" },
                report
                    .peak_memory_bytes
                    .map(|peak| format!(", peak memory {:.0} MB", mb(peak)))
                    .unwrap_or_default()
            );
    for s in &report.stages {
        out!(
            "  {:<14} {:<12} {:<17} {:>6} entries {:>10.1} MB {:>7.2} s",
            s.id,
            s.kind,
            s.action,
            s.entries,
            mb(s.bytes),
            s.seconds
        );
    }
}

fn stderr_is_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

/// Bars on a terminal, periodic log lines elsewhere (cluster logs), nothing with `-q`.
fn progress_mode(cli: &Cli) -> ProgressMode {
    if cli.quiet {
        ProgressMode::Off
    } else if stderr_is_terminal() && cli.log_format == LogFormat::Text {
        ProgressMode::Bars
    } else {
        ProgressMode::Lines {
            interval: std::time::Duration::from_secs_f64(cli.progress_interval.max(0.0)),
        }
    }
}

/// Stage events and progress lines go to stderr: at `info` where nobody watches bars (logs,
/// JSON), at `warn` on a terminal (the bars say it), `error` with `-q`. `SENSORIUM_INGEST_LOG`
/// (an `EnvFilter` directive) overrides.
fn init_logging(cli: &Cli) {
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => "error",
        (false, 0) if stderr_is_terminal() && cli.log_format == LogFormat::Text => "warn",
        (false, 0 | 1) => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("SENSORIUM_INGEST_LOG")
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(format!("sensorium_ingest={level},warn"))
        });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Its own report of a failed write goes to stderr too, and panics when stderr is a
        // closed pipe (`... 2>&1 | head`): a log line lost there must not stop a conversion.
        .log_internal_errors(false);
    match cli.log_format {
        LogFormat::Json => builder.json().with_current_span(false).init(),
        LogFormat::Text => builder.with_ansi(stderr_is_terminal()).init(),
    }
}

/// One function per command, each printing its own result.
fn run(cli: Cli) -> Result<(), Error> {
    let progress = progress_mode(&cli);
    match cli.command {
        Command::Plan { target } => run_plan(target, progress),
        Command::Verify { path, against } => match StoreLocation::parse(&path)? {
            StoreLocation::Local(path) => run_verify(&path, against.as_deref()),
            StoreLocation::Bucket(url) => run_verify_bucket(&url, against.as_deref()),
        },
        Command::Convert(args) => run_convert(args, progress),
        Command::Finalize(args) => run_finalize(args, progress),
        Command::Inspect {
            source,
            json,
            pipeline,
        } => run_inspect(&source, json, &pipeline),
        Command::Ingest(args) => run_ingest(args, progress),
        Command::Completions { shell } => run_completions(shell),
        Command::PipelineSchema => {
            outp!("{}", Pipeline::json_schema());
            Ok(())
        }
        Command::DefaultPipeline { name } => {
            outp!("{}", embedded::by_name(&name)?);
            Ok(())
        }
    }
}

fn run_plan(target: Target, progress: ProgressMode) -> Result<(), Error> {
    let defaults = ResourceArgs {
        max_memory: None,
        no_direct_io: false,
    };
    let writing = WriteArgs::default();
    print_plan(&convert::plan(
        &target.options(None, &defaults, &writing, progress)?,
    )?);
    Ok(())
}

/// Every dataset is verified and reported before the exit status says whether any failed.
fn run_verify(path: &Path, against: Option<&Path>) -> Result<(), Error> {
    let datasets = verify::datasets(path)?;
    if against.is_some() && datasets.len() != 1 {
        return Err(Error::bad_input(
            path.display().to_string(),
            "--against compares one dataset with its source, but this is a store of several",
            "name the dataset: STORE/NAME",
        ));
    }
    print_verify_reports(datasets.iter().map(|d| verify::verify(d, against)))
}

fn run_verify_bucket(url: &str, against: Option<&Path>) -> Result<(), Error> {
    print_verify_reports(verify::verify_bucket(url, against)?.into_iter().map(Ok))
}

/// Each report printed as it comes; then the exit status says whether any failed.
fn print_verify_reports(
    reports: impl Iterator<Item = Result<VerifyReport, Error>>,
) -> Result<(), Error> {
    let mut failures = Vec::new();
    for report in reports {
        let report = report?;
        print_verify_report(&report);
        failures.extend(report.failures);
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(Error::Verify { failures })
    }
}

fn print_verify_report(report: &VerifyReport) {
    let status = if report.failures.is_empty() {
        "ok"
    } else {
        "FAILED"
    };
    out!(
        "{status:<6} {}: {} files ({:.1} MB), {:.1} MB of values decoded in {:.2} s ({:.2} GB/s)",
        report.dataset.display(),
        report.files,
        report.file_bytes as f64 / 1e6,
        report.decoded_bytes as f64 / 1e6,
        report.seconds,
        report.decoded_bytes as f64 / 1e9 / report.seconds.max(1e-9)
    );
}

/// `convert`, `convert --dry-run` and `convert --shard K/N`.
fn run_convert(args: ConvertArgs, progress: ProgressMode) -> Result<(), Error> {
    let options = args
        .target
        .options(args.threads, &args.resources, &args.writing, progress)?;
    let shard = args
        .shard
        .map(|s| s.resolve(|name| std::env::var(name).ok()))
        .transpose()?;
    if args.dry_run {
        return print_dry_run(&options, shard);
    }
    if let Some(shard) = shard {
        print_shard_report(&convert::shard_task(&options, shard)?);
        return Ok(());
    }
    let report = convert::convert(&options)?;
    if report.up_to_date {
        out!(
            "{} is up to date ({}); nothing to do",
            report.dataset,
            report.dataset_dir.display()
        );
    } else {
        print_report("converted", &report);
    }
    Ok(())
}

/// The plan, and with `--shard` the trials that task would convert.
fn print_dry_run(options: &ConvertOptions, shard: Option<Shard>) -> Result<(), Error> {
    print_plan(&convert::plan(options)?);
    if let Some(shard) = shard {
        let (trials, block) = convert::plan_part(options, shard)?;
        out!(
            "  shard {shard}: trials {}..{} (parts are whole blocks of {block} trials); trial_array stages only, then `finalize`",
            trials.start,
            trials.end
        );
    }
    Ok(())
}

fn print_shard_report(r: &ShardReport) {
    let what = if r.up_to_date {
        "the dataset is complete and up to date; nothing to do".to_string()
    } else if r.trials.is_empty() {
        "no trials in this part (there are more tasks than blocks of trials); its receipt says so"
            .to_string()
    } else if r.already_done {
        "already converted (its receipt matches its files); nothing to do".to_string()
    } else {
        format!(
            "converted {:.1} MB in {:.1} s",
            r.bytes as f64 / 1e6,
            r.seconds
        )
    };
    out!(
        "{} shard {}: trials {}..{} -> {}: {what}",
        r.dataset,
        r.shard,
        r.trials.start,
        r.trials.end,
        r.shards_dir.display()
    );
}

fn run_finalize(args: FinalizeArgs, progress: ProgressMode) -> Result<(), Error> {
    let dataset = args.dataset.to_string_lossy().into_owned();
    let finalized = convert::finalize_at(
        &FinalizeOptions {
            dataset_dir: args.dataset,
            source: args.source,
            threads: args.threads,
            max_memory: args.resources.max_memory,
            direct_io: !args.resources.no_direct_io,
            progress,
            wait: args.writing.waiting(),
            no_space_check: args.writing.no_space_check,
        },
        &dataset,
    )?;
    match finalized {
        Finalized::AlreadyComplete(dir) => {
            out!("{} is complete; no sharded run to finalize", dir.display())
        }
        Finalized::Converted(report) => print_report("finalized", &report),
    }
    Ok(())
}

fn run_inspect(source: &Path, json: bool, pipeline: &str) -> Result<(), Error> {
    // The source is opened before the pipeline argument is read, so that when both are wrong
    // the source is the one reported.
    let source = Source::open(source)?;
    let report = inspect::inspect_with(&source, &PipelineChoice::from_argument(pipeline)?)?;
    if json {
        out!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(|e| Error::Internal(e.to_string()))?
        );
    } else {
        outp!("{}", report.to_text());
    }
    Ok(())
}

/// Every source is reported; the exit status says whether any failed.
fn run_ingest(args: IngestArgs, progress: ProgressMode) -> Result<(), Error> {
    let (store, bucket) = convert::local_and_bucket(args.out);
    let report = ingest::ingest(&ingest::IngestOptions {
        inbox: args.inbox,
        store,
        bucket,
        pipeline: PipelineChoice::from_argument(&args.pipeline)?,
        threads: args.threads,
        max_memory: args.resources.max_memory,
        direct_io: !args.resources.no_direct_io,
        min_age: std::time::Duration::from_secs(args.min_age),
        settle: std::time::Duration::from_secs_f64(args.settle.max(0.0)),
        no_space_check: args.no_space_check,
        progress,
    })?;
    print_ingest_report(&report);
    if let Some(stopped) = report.stopped {
        return Err(stopped);
    }
    if report.failed.is_empty() {
        return Ok(());
    }
    Err(Error::SourcesFailed {
        failures: report
            .failed
            .iter()
            .map(|(p, w)| format!("{}: {w}", p.display()))
            .collect(),
    })
}

fn print_ingest_report(report: &IngestReport) {
    for (path, dataset) in &report.added {
        out!("added    {} -> {dataset}", path.display());
    }
    for (path, why) in &report.skipped {
        out!("skipped  {}: {why}", path.display());
    }
    for (path, why) in &report.failed {
        out!("failed   {}: {why}", path.display());
    }
    out!(
        "{} added, {} skipped, {} failed",
        report.added.len(),
        report.skipped.len(),
        report.failed.len()
    );
}

fn run_completions(shell: clap_complete::Shell) -> Result<(), Error> {
    let mut command = <Cli as clap::CommandFactory>::command();
    clap_complete::generate(
        shell,
        &mut command,
        "sensorium-ingest",
        &mut std::io::stdout(),
    );
    Ok(())
}

/// mimalloc v2's `mi_option_purge_delay` (its place in `mi_option_t`, mimalloc.h; the sys
/// crate names no constant for it) and that option's default.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
const MI_DEFAULT_PURGE_DELAY_MS: std::ffi::c_long = 10;

/// Freed memory goes back to the system at once instead of after mimalloc's 10 ms delay, for
/// the commands that convert. Why: with the delay, a stage's buffers were sometimes still mapped
/// when the next stage made its own, so the peak depended on timing; purged at once, it is
/// lower and flat in the number of trials, at the same CPU. Conversions keep their big buffers
/// per thread, so they lose nothing by it. `verify` does not: zarrs decodes every chunk into a
/// fresh buffer, which, purged at once, the kernel faulted in and zeroed again each time (far
/// more page faults, a much slower `verify`), so it keeps the delay. The figures are in
/// docs/performance.md, "mimalloc, purge policy per command".
/// Left alone where `MIMALLOC_PURGE_DELAY` is set (the user's choice), or where the option at
/// that place does not hold the default delay (another mimalloc whose options are numbered
/// otherwise).
fn purge_freed_memory_at_once() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: called from `main` right after the command line is parsed, before any other
    // thread exists (mimalloc's option calls are not thread safe); both take and return plain
    // integers.
    unsafe {
        if libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) == MI_DEFAULT_PURGE_DELAY_MS {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Command::Convert(_) | Command::Finalize(_) | Command::Ingest(_)
    ) {
        purge_freed_memory_at_once();
    }
    init_logging(&cli);
    sensorium_ingest::interrupt::install();
    let json = cli.log_format == LogFormat::Json;
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if json {
                tracing::error!(exit_code = e.exit_code(), "{e}");
            } else {
                let _ =
                    std::io::Write::write_fmt(&mut std::io::stderr(), format_args!("error: {e}\n"));
            }
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
