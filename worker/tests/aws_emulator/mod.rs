//! The local AWS emulator the CloudWatch tests talk to: moto, behind the CBOR proxy
//! (`tests/aws/`), started by `./scripts/test` (or by hand with `tests/aws/start-moto.sh`).
#![allow(dead_code)] // each test binary uses part of it

use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_cloudwatch::config::{Credentials, Region, SharedCredentialsProvider};

pub const REGION: &str = "us-east-1";

/// URLs from `tests/aws/start-moto.sh`.
pub struct Emulator {
    /// The CBOR proxy: what the SDK calls (`TRADEEON_TEST_CLOUDWATCH_URL`).
    pub cloudwatch_url: String,
    /// moto itself (`TRADEEON_TEST_MOTO_URL`).
    pub moto_url: String,
}

/// The emulator's URLs, or `None` (after saying so) when they are not set and this is not CI.
/// On CI (`CI` set) a missing emulator fails the test.
pub fn emulator(test: &str) -> Option<Emulator> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    match (var("TRADEEON_TEST_CLOUDWATCH_URL"), var("TRADEEON_TEST_MOTO_URL")) {
        (Some(cloudwatch_url), Some(moto_url)) => {
            for url in [&cloudwatch_url, &moto_url] {
                // Never a real AWS endpoint: these tests write metrics and dashboards.
                assert!(
                    url.starts_with("http://127.") || url.starts_with("http://localhost:"),
                    "the AWS emulator must be on loopback, got {url}"
                );
            }
            Some(Emulator { cloudwatch_url, moto_url })
        }
        _ if var("CI").is_some() => panic!(
            "{test}: TRADEEON_TEST_CLOUDWATCH_URL and TRADEEON_TEST_MOTO_URL are not set; run ./scripts/test, \
             which starts moto and the CBOR proxy (tests/aws/start-moto.sh)"
        ),
        _ => {
            eprintln!(
                "skipping: {test} needs the AWS emulator (TRADEEON_TEST_CLOUDWATCH_URL and TRADEEON_TEST_MOTO_URL); \
                 run ./scripts/test, or tests/aws/start-moto.sh ENV_FILE and export its lines"
            );
            None
        }
    }
}

/// AWS configuration for an endpoint on this machine: fixed region and dummy credentials, so
/// nothing is looked up from the environment, a profile or instance metadata.
pub fn sdk_config(endpoint_url: &str) -> SdkConfig {
    SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(endpoint_url)
        .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
            "testing", "testing", None, None, "tests",
        )))
        .http_client(tradeeon_worker::cloudwatch::https_client())
        .build()
}

/// A CloudWatch client for `endpoint_url`.
pub fn client(endpoint_url: &str) -> aws_sdk_cloudwatch::Client {
    aws_sdk_cloudwatch::Client::new(&sdk_config(endpoint_url))
}

/// A namespace no other test (or earlier run) uses.
pub fn unique_namespace(test: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("Tradeeon/Test/{test}/{nanos}")
}
