//! `progressd jobs`: a table of jobs (or JSON lines with `--json`), in job-id order.

use std::process::ExitCode;

use clap::Args;

use super::{ago, parse_time, CliError, Client, ClientArgs, JobPage, Snapshot};
use crate::model::Status;

#[derive(Debug, Args)]
pub struct JobsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Only jobs with this status.
    #[arg(long, value_parser = super::publish::parse_status)]
    pub status: Option<Status>,
    /// Only jobs whose id starts with this.
    #[arg(long)]
    pub prefix: Option<String>,
    /// At most this many jobs.
    #[arg(long, default_value_t = 1000)]
    pub limit: usize,
    /// One snapshot per line, as JSON, for scripts.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: JobsArgs) -> ExitCode {
    match list(&args).await {
        Ok(jobs) => {
            if args.json {
                for job in &jobs {
                    println!("{job}");
                }
            } else {
                print!("{}", table(&jobs));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("progressd: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Pages through `GET /v1/jobs` until `--limit` jobs or the last page.
async fn list(args: &JobsArgs) -> Result<Vec<serde_json::Value>, CliError> {
    let client = Client::new(&args.client)?;
    let mut jobs = Vec::new();
    let mut cursor: Option<String> = None;
    while jobs.len() < args.limit {
        let page_size = (args.limit - jobs.len()).min(1000).to_string();
        let mut query = vec![("limit", page_size.as_str())];
        if let Some(status) = args.status {
            query.push(("status", status.as_str()));
        }
        if let Some(prefix) = &args.prefix {
            query.push(("prefix", prefix));
        }
        if let Some(c) = &cursor {
            query.push(("cursor", c));
        }
        let url = format!("{}/v1/jobs", client.base());
        let page: JobPage = client.json(client.get(&url).query(&query)).await?;
        jobs.extend(page.jobs);
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    jobs.truncate(args.limit);
    Ok(jobs)
}

/// Aligned columns: JOB, STATUS, PERCENT, STAGE, UPDATED (how long ago).
fn table(jobs: &[serde_json::Value]) -> String {
    let header = ["JOB", "STATUS", "PERCENT", "STAGE", "UPDATED"].map(str::to_owned);
    let mut rows = vec![header];
    for job in jobs {
        let Ok(s) = serde_json::from_value::<Snapshot>(job.clone()) else {
            continue;
        };
        rows.push([
            s.job.clone(),
            s.status.as_str().to_owned(),
            s.percent.map(|p| format!("{p:.0}%")).unwrap_or_default(),
            s.stage.clone().unwrap_or_default(),
            parse_time(&s.updated_at)
                .map(|t| format!("{} ago", ago(t)))
                .unwrap_or(s.updated_at),
        ]);
    }
    let widths: Vec<usize> = (0..5)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}
