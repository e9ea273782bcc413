//! Shared by the admin binaries: URL resolution, masked usage errors, exit
//! codes, and the guarded flow of `db-reset` and `db-nuke`. Not a binary.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use workflow_db::admin::{self, Confirmation, GuardOptions, Operation, Plan};
use workflow_db::config::redact_urls_in;
use workflow_db::{Config, DatabaseUrl};

/// Loads `.env` and parses the command line. A usage error exits 2 (help and
/// version 0) with any URL password in the echoed arguments masked.
pub fn parse<A: Parser>() -> A {
    let _ = dotenvy::dotenv();
    match A::try_parse() {
        Ok(args) => args,
        Err(e) => {
            let text = redact_urls_in(&e.render().to_string());
            if e.use_stderr() {
                eprint!("{text}");
            } else {
                print!("{text}");
            }
            std::process::exit(e.exit_code());
        }
    }
}

/// `--database-url` (clap also reads DATABASE_URL into it), else the configuration's.
pub fn database_url(arg: Option<&str>) -> anyhow::Result<DatabaseUrl> {
    Ok(match arg {
        Some(url) => DatabaseUrl::parse(url)?,
        None => Config::from_env()?.database_url,
    })
}

/// The exit code of `result`, printing an error as `command: error: ..`
/// (documented codes: see `workflow_db::admin::exit_code`).
pub fn finish(command: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e
                .downcast_ref::<workflow_db::Error>()
                .map_or(admin::EXIT_ERROR, admin::exit_code);
            // Guard refusals read "refused by rule ..." on their own.
            let kind = if code == admin::EXIT_ERROR {
                "error: "
            } else {
                ""
            };
            eprintln!("{command}: {kind}{}", redact_urls_in(&format!("{e:#}")));
            ExitCode::from(code)
        }
    }
}

/// The options of the guarded commands (`db-reset`, `db-nuke`).
#[derive(clap::Args, Debug)]
pub struct GuardArgs {
    /// Database URL (overrides DATABASE_URL from the environment or .env).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Print the target and what would be touched, run the guard, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Confirm non-interactively by naming the target database (required without a terminal).
    #[arg(long, value_name = "DATABASE")]
    pub confirm: Option<String>,
    /// Allow a server that is neither loopback nor a unix socket (guard rule 4).
    #[arg(long)]
    pub allow_remote: bool,
    /// Allow a URL that looks like production (guard rule 3); never overrides rules 1 and 2.
    #[arg(long)]
    pub allow_production_looking_url: bool,
}

/// Guard, print the plan, confirm, execute. Returns the executed plan (None for a dry run).
pub fn run_guarded(operation: Operation, args: &GuardArgs) -> anyhow::Result<Option<Plan>> {
    let url = database_url(args.database_url.as_deref())?;
    println!("{}: target {}", operation.command(), url.target());
    let options = GuardOptions {
        allow_remote: args.allow_remote,
        allow_production_looking_url: args.allow_production_looking_url,
        ..GuardOptions::from_env()
    };
    let prepared = admin::prepare(operation, &url, &options)?;
    print!("{}", prepared.plan());
    if args.dry_run {
        println!("dry run: the guard allows this; nothing was changed");
        return Ok(None);
    }
    let stdin = std::io::stdin();
    let confirmed = match args.confirm.as_deref() {
        Some(name) => prepared.confirm(Confirmation::Flag(Some(name)))?,
        None if stdin.is_terminal() => prepared.confirm(Confirmation::Interactive {
            input: &mut stdin.lock(),
            output: &mut std::io::stderr(),
        })?,
        None => prepared.confirm(Confirmation::Flag(None))?,
    };
    Ok(Some(confirmed.execute()?))
}
