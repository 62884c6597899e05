//! The OpenAPI 3 document, generated from the handlers' own annotations (utoipa): the routes
//! are registered through `utoipa_axum`, so a route cannot be served without being documented.

use std::sync::LazyLock;

use axum::Json;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::link::LinkBuilder;
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, Response, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use utoipa_axum::router::OpenApiRouter;

use crate::AppState;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tradeeon Connect API",
        description = "Connect exchange accounts by API key. The API authenticates (Supabase JWT), validates, \
                       encrypts and enqueues jobs; workers check the keys. Every error is \
                       `{\"error\": {\"code\", \"message\", \"field\"?, \"job_id\"?}}`. Every answer \
                       carries an `X-Request-Id` header, which the service's log lines for that request carry \
                       too: the request's own `X-Request-Id` if it is at most 64 letters, digits or `-_.:+/=`, \
                       otherwise a new UUID."
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "connections", description = "Exchange connections and their audit log"),
        (name = "jobs", description = "Status of queued work"),
        (name = "zerodha", description = "The Kite Connect login flow"),
        (name = "catalog", description = "Supported exchanges and egress IPs (public)"),
        (name = "operations", description = "Health, readiness, this document (public)"),
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
    let (_, mut document) =
        OpenApiRouter::<AppState>::with_openapi(ApiDoc::openapi()).merge(crate::routes::all()).split_for_parts();
    for item in document.paths.paths.values_mut() {
        for operation in [&mut item.post, &mut item.delete].into_iter().flatten() {
            if operation.security.as_ref().is_some_and(|s| !s.is_empty()) {
                operation.responses.responses.entry("403".into()).or_insert_with(|| {
                    error_response("With `REQUIRE_AAL2`, the session did not pass a second factor (`mfa_required`)")
                        .into()
                });
            }
        }
        for operation in operations(item) {
            common_responses(operation);
            links(operation);
        }
    }
    document
}

fn operations(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch].into_iter().flatten()
}

/// Answers that the shared layers give on every route they wrap, documented once here rather
/// than on each handler (which could forget one):
/// * the bearer-token extractor: `401` (with `WWW-Authenticate`) and `409 email_in_use` (the
///   token's email belongs to another account's profile);
/// * the database and the request deadline: `503` on every route that needs the database;
/// * the write budget: `Retry-After` on every `429`.
fn common_responses(operation: &mut Operation) {
    let secured = operation.security.as_ref().is_some_and(|s| !s.is_empty());
    let responses = &mut operation.responses.responses;
    if secured {
        let unauthorized =
            responses.entry("401".into()).or_insert_with(|| error_response("Missing or invalid token").into());
        if let RefOr::T(response) = unauthorized {
            response.headers.insert(
                "WWW-Authenticate".into(),
                HeaderBuilder::new()
                    .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
                    .description(Some("`Bearer`, or `Bearer error=\"invalid_token\"` when a token was sent"))
                    .build()
                    .into(),
            );
        }
        const EMAIL_IN_USE: &str = "the token's email address belongs to another account (`email_in_use`)";
        match responses.get_mut("409") {
            Some(RefOr::T(conflict)) => conflict.description = format!("{}; or {EMAIL_IN_USE}", conflict.description),
            Some(RefOr::Ref(_)) => {}
            None => {
                let mut description = EMAIL_IN_USE.to_owned();
                description[..1].make_ascii_uppercase();
                responses.insert("409".into(), error_response(&description).into());
            }
        }
        responses.entry("503".into()).or_insert_with(|| {
            error_response("The database did not answer, or the request took over 15 s; retry later").into()
        });
    }
    if let Some(RefOr::T(too_many)) = responses.get_mut("429") {
        too_many.headers.insert(
            "Retry-After".into(),
            HeaderBuilder::new()
                .schema(Some(ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(1))))
                .description(Some("Seconds until the write budget allows another write"))
                .build()
                .into(),
        );
    }
}

fn error_response(description: &str) -> Response {
    ResponseBuilder::new()
        .description(description)
        .content("application/json", ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build())
        .build()
}

/// OpenAPI links from the answers that carry ids to the operations that take them, so that
/// clients (and schemathesis' stateful phase) know which id goes where: a connection id and a
/// job id are both `id` in a path, and are not interchangeable.
fn links(operation: &mut Operation) {
    let targets: &[(&str, &str, &str)] = match operation.operation_id.as_deref() {
        Some("create_connection") => &[
            ("GetJob", "get_job", "$response.body#/job/id"),
            ("RotateConnection", "rotate_connection", "$response.body#/connection/id"),
            ("RevokeConnection", "revoke_connection", "$response.body#/connection/id"),
        ],
        Some("test_connection" | "rotate_connection" | "session") => &[("GetJob", "get_job", "$response.body#/job/id")],
        _ => return,
    };
    if let Some(RefOr::T(accepted)) = operation.responses.responses.get_mut("202") {
        for (name, target, expression) in targets {
            accepted.links.insert(
                (*name).into(),
                LinkBuilder::new().operation_id(*target).parameter("id", *expression).build().into(),
            );
        }
    }
}

static DOCUMENT: LazyLock<serde_json::Value> =
    LazyLock::new(|| serde_json::to_value(openapi()).expect("the OpenAPI document serializes"));
