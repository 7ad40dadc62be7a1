//! `progressd publish JOB …`: one update from the command line; prints the event's seq.

use std::process::ExitCode;

use clap::{ArgGroup, Args};

use super::{Client, ClientArgs};
use crate::model::{Status, Update};

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("progress").args(["percent", "current"])))]
pub struct PublishArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The job's id.
    pub job: String,
    /// Progress in percent (0–100).
    #[arg(long)]
    pub percent: Option<f64>,
    /// Units done; with --total the daemon derives the percent.
    #[arg(long, requires = "total")]
    pub current: Option<u64>,
    /// Units in all.
    #[arg(long, requires = "current")]
    pub total: Option<u64>,
    #[arg(long)]
    pub stage: Option<String>,
    #[arg(long)]
    pub message: Option<String>,
    /// queued, running, succeeded, failed or cancelled (the last three end the job).
    #[arg(long, value_parser = parse_status)]
    pub status: Option<Status>,
    /// Free-form JSON attached to the event.
    #[arg(long, value_parser = parse_json)]
    pub data: Option<serde_json::Value>,
    /// Send an Idempotency-Key, so that running the same command again appends nothing.
    #[arg(long)]
    pub idempotency_key: Option<String>,
}

pub fn parse_status(raw: &str) -> Result<Status, String> {
    Status::parse(raw)
        .ok_or_else(|| "expected queued, running, succeeded, failed or cancelled".to_owned())
}

fn parse_json(raw: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(raw).map_err(|e| format!("not JSON: {e}"))
}

pub async fn run(args: PublishArgs) -> ExitCode {
    let update = Update {
        status: args.status,
        percent: args.percent,
        current: args.current,
        total: args.total,
        stage: args.stage,
        message: args.message,
        data: args.data,
    };
    let result = async {
        let client = Client::new(&args.client)?;
        client
            .publish(&args.job, &[update], args.idempotency_key.as_deref())
            .await
    }
    .await;
    match result {
        Ok(published) => {
            println!("{}", published.seq);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("progressd: {e}");
            ExitCode::FAILURE
        }
    }
}
