//! `db-env`: show or change the environment stamp a database remembers
//! (`__workflow_db_metadata`). Changing it is explicit and bound to the
//! database's name; `db-migrate` never lowers a `production` stamp.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::json;
use workflow_db::Environment;
use workflow_db::cli::{self, CommonArgs};
use workflow_db::migrate;

/// Show or change the environment stamp of DATABASE_URL.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the database's environment stamp.
    Show,
    /// Stamp the database with ENVIRONMENT (e.g. development, staging, production).
    Set {
        /// The new stamp.
        environment: String,
        /// The target database's name, to prove you mean this one.
        #[arg(long, value_name = "DATABASE")]
        confirm: String,
    },
}

fn main() -> ExitCode {
    let args: Args = cli::parse();
    args.common.reporter().finish("db-env", run(&args))
}

fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let out = args.common.reporter();
    let url = args.common.url()?;
    let mut conn = workflow_db::pool::connect(&url)?;
    match &args.command {
        Command::Show => {
            let stamp = migrate::environment_stamp(&mut conn)?;
            out.event(
                "stamp",
                format!(
                    "{}: environment stamp {}",
                    url.target(),
                    stamp.as_deref().unwrap_or("none")
                ),
                json!({ "target": url.target(), "stamp": stamp }),
            );
        }
        Command::Set {
            environment,
            confirm,
        } => {
            let environment = Environment::from_name(environment);
            let before =
                workflow_db::admin::set_environment_stamp(&mut conn, &environment, confirm)?;
            out.event(
                "stamped",
                format!(
                    "{}: environment stamp {} -> {environment}",
                    url.target(),
                    before.as_deref().unwrap_or("none")
                ),
                json!({ "target": url.target(), "from": before, "to": environment.as_str() }),
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
