//! What a client needs before connecting: the supported exchanges and the egress addresses to
//! whitelist. Public (no token): the portal shows them before sign-in too.

use axum::Json;
use axum::extract::State;
use tradeeon_shared::domain::Exchange;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::views::{CredentialField, EgressView, ExchangeInfo};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_exchanges)).routes(routes!(egress))
}

const API_KEY: CredentialField =
    CredentialField { name: "api_key", label: "API key", required: true, help: "The key's public identifier." };

fn exchanges() -> Vec<ExchangeInfo> {
    vec![
        ExchangeInfo {
            id: Exchange::Binance,
            name: "Binance",
            connect_flow: "api_key",
            fields: vec![
                API_KEY,
                CredentialField {
                    name: "api_secret",
                    label: "Secret key",
                    required: true,
                    help: "Shown once when the key is created. Enable Reading; never enable withdrawals.",
                },
            ],
            docs_url: "https://www.binance.com/en/support/faq/how-to-create-api-keys-on-binance-360002502072",
        },
        ExchangeInfo {
            id: Exchange::Coinbase,
            name: "Coinbase",
            connect_flow: "api_key",
            fields: vec![
                CredentialField {
                    name: "api_key",
                    label: "API key name",
                    required: true,
                    help: "Coinbase Developer Platform: organizations/{org_id}/apiKeys/{key_id}. Coinbase Exchange: \
                           the API key.",
                },
                CredentialField {
                    name: "api_secret",
                    label: "Private key / API secret",
                    required: true,
                    help: "CDP: the EC private key (PEM, including the BEGIN/END lines) or the Ed25519 secret. \
                           Coinbase Exchange: the base64 secret.",
                },
                CredentialField {
                    name: "passphrase",
                    label: "Passphrase",
                    required: false,
                    help: "Only for Coinbase Exchange keys; leave empty for CDP keys.",
                },
            ],
            docs_url: "https://docs.cdp.coinbase.com/advanced-trade/docs/getting-started",
        },
        ExchangeInfo {
            id: Exchange::Kraken,
            name: "Kraken",
            connect_flow: "api_key",
            fields: vec![
                API_KEY,
                CredentialField {
                    name: "api_secret",
                    label: "Private key",
                    required: true,
                    help: "The base64 private key shown when the key is created. Enable Query Funds.",
                },
                CredentialField {
                    name: "passphrase",
                    label: "Two-factor password",
                    required: false,
                    help: "Only if the key has a two-factor password (OTP).",
                },
            ],
            docs_url: "https://support.kraken.com/hc/en-us/articles/360000919966-How-to-create-an-API-key",
        },
        ExchangeInfo {
            id: Exchange::Zerodha,
            name: "Zerodha (Kite Connect)",
            connect_flow: "oauth",
            fields: vec![
                CredentialField {
                    name: "api_key",
                    label: "Kite Connect API key",
                    required: true,
                    help: "Your Kite Connect app's API key (developers.kite.trade).",
                },
                CredentialField {
                    name: "api_secret",
                    label: "Kite Connect API secret",
                    required: true,
                    help: "Your Kite Connect app's API secret. You then log in to Kite to create a session.",
                },
            ],
            docs_url: "https://kite.trade/docs/connect/v3/user/",
        },
    ]
}

/// The supported exchanges, the credential fields each needs and where to create a key.
#[utoipa::path(
    get,
    path = "/exchanges",
    tag = "catalog",
    responses((status = 200, description = "The four supported exchanges", body = [ExchangeInfo]))
)]
async fn list_exchanges() -> Json<Vec<ExchangeInfo>> {
    Json(exchanges())
}

/// The static egress IPs users whitelist on their exchange API keys (`EGRESS_IPS`).
#[utoipa::path(
    get,
    path = "/egress",
    tag = "catalog",
    responses((status = 200, description = "Addresses our exchange requests come from", body = EgressView))
)]
async fn egress(State(state): State<AppState>) -> Json<EgressView> {
    Json(EgressView { ips: state.settings.egress_ips.iter().map(ToString::to_string).collect() })
}
