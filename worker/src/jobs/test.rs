//! `test`: "decrypt the job's credentials, run the check, return the result; store nothing
//! else." The credentials are not stored anywhere, so there is no connection to update. The
//! `tested` audit entry, with the verdict and the requester the API put in the payload, is written
//! by the statement that settles the job.

use tradeeon_shared::domain::Exchange;
use tradeeon_shared::jobs::ClaimedJob;
use tradeeon_shared::store::EncryptedCredentials;

use super::{JobEnv, JobResult, decrypt_credentials, record_or_defer, settle};

#[tracing::instrument(name = "test_job", skip_all, fields(exchange = %exchange))]
pub(super) async fn run(
    env: &JobEnv,
    job: &ClaimedJob,
    exchange: Exchange,
    credentials: &EncryptedCredentials,
) -> JobResult {
    let credentials = decrypt_credentials(&env.keyring, credentials, None)?;
    let (outcome, latency) = env.check(exchange, &credentials).await;
    drop(credentials);
    let result = match record_or_defer(outcome, latency) {
        Ok(result) => result,
        Err(defer) => return Ok(defer),
    };
    tracing::info!(code = result.code.as_str(), latency_ms = result.latency_ms, "credentials tested");
    Ok(settle(job, result))
}
