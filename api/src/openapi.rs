//! The OpenAPI 3 document, generated from the handlers' own annotations (utoipa): the routes
//! are registered through `utoipa_axum`, so a route cannot be served without being documented.

use std::sync::LazyLock;

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use utoipa_axum::router::OpenApiRouter;

use crate::AppState;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tradeeon Connect API",
        description = "Connect exchange accounts by API key. The API authenticates (Supabase JWT), validates, \
                       encrypts and enqueues jobs; workers check the keys. Every error is \
                       `{\"error\": {\"code\", \"message\", \"field\"?, \"job_id\"?}}`."
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "connections", description = "Exchange connections and their audit log"),
        (name = "jobs", description = "Status of queued work"),
        (name = "zerodha", description = "The Kite Connect login flow"),
        (name = "catalog", description = "Supported exchanges and egress IPs (public)"),
        (name = "operations", description = "Health, readiness, metrics, this document (public)"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some("A Supabase access token"))
                    .build(),
            ),
        );
    }
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI 3 document", body = Object))
)]
pub async fn document() -> Json<&'static serde_json::Value> {
    Json(&DOCUMENT)
}

/// The document, built from the same route table [`crate::router`] serves.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let (_, document) =
        OpenApiRouter::<AppState>::with_openapi(ApiDoc::openapi()).merge(crate::routes::all()).split_for_parts();
    document
}

static DOCUMENT: LazyLock<serde_json::Value> =
    LazyLock::new(|| serde_json::to_value(openapi()).expect("the OpenAPI document serializes"));
