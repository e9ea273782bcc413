//! `db-env`: show or change the environment stamp a database remembers
//! (`__workflow_db_metadata`). Changing it is explicit and bound to the
//! database's name; `db-migrate` never lowers a `production` stamp.

#[allow(dead_code)]
mod common;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use workflow_db::Environment;
use workflow_db::migrate;

/// Show or change the environment stamp of DATABASE_URL.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Database URL (overrides DATABASE_URL from the environment or .env).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    database_url: Option<String>,
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
    let args: Args = common::parse();
    common::finish("db-env", run(&args))
}

fn run(args: &Args) -> anyhow::Result<()> {
    let url = common::database_url(args.database_url.as_deref())?;
    let mut conn = migrate::connect(&url)?;
    match &args.command {
        Command::Show => {
            let stamp = migrate::environment_stamp(&mut conn)?;
            println!(
                "{}: environment stamp {}",
                url.target(),
                stamp.as_deref().unwrap_or("none")
            );
        }
        Command::Set {
            environment,
            confirm,
        } => {
            let environment = Environment::from_name(environment);
            let before =
                workflow_db::admin::set_environment_stamp(&mut conn, &environment, confirm)?;
            println!(
                "{}: environment stamp {} -> {environment}",
                url.target(),
                before.as_deref().unwrap_or("none")
            );
        }
    }
    Ok(())
}
