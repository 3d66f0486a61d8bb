//! Codes: upload (multipart `data` + `file`, or plain JSON for image codes), list, show,
//! revisions, download, delete, pause/resume of the task queue, cancel_all, stats.

use axum::Json;
use axum::extract::{FromRequest, Multipart, Path, Request, State};
use axum::http::header::{CONTENT_DISPOSITION, CONTENT_LENGTH, CONTENT_TYPE};
use axum::response::IntoResponse;
use serde::Deserialize;
use stevedore_api_types::v2;
use stevedore_model::TaskStatus;
use stevedore_store::{CodeCancellation, RevisionPackage, StatsWindow};

use super::{Paging, message};
use crate::AppState;
use crate::auth::ProjectAccess;
use crate::config::ServerConfig;
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiQuery, parse_json, read_body};
use crate::package::{CheckedPackage, UploadSpool};
use crate::wire;

/// Upload a code: a new code, or a new revision of the code with the same name.
#[utoipa::path(post, path = "/2/projects/{project_id}/codes", tag = "codes",
    params(("project_id" = String, Path)),
    request_body(content = v2::CodeUpload, description = "multipart/form-data with a `data` part holding this JSON and an optional `file` part holding a zip; or this JSON alone for image codes"),
    responses((status = 200, body = v2::CodeUploaded), (status = 400, body = v2::Message), (status = 413, body = v2::Message)))]
pub async fn upload(
    State(state): State<AppState>,
    access: ProjectAccess,
    request: Request,
) -> ApiResult<Json<v2::CodeUploaded>> {
    let is_multipart = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| {
            value
                .to_ascii_lowercase()
                .starts_with("multipart/form-data")
        });
    let (mut upload, package) = if is_multipart {
        read_multipart(request, &state).await?
    } else {
        let body = read_body(request.into_body(), ServerConfig::MAX_FORM_PART_BYTES).await?;
        (parse_json::<v2::CodeUpload>(&body)?, None)
    };
    // IronWorker: a known name without image, runtime or package only changes options. The
    // package goes on with the options (a runtime code's, and the one an image code was
    // uploaded with), by its checksum: the store neither reads nor copies it.
    let mut kept_package = None;
    if wire::is_options_update(&upload, package.is_some())
        && let Some(name) = upload.name.as_deref()
    {
        match state.store.get_code_by_name(&access.project_id, name).await {
            Ok(latest) => {
                kept_package = latest.package_sha256.clone();
                upload = wire::options_over(upload, &latest.spec)?;
            }
            // An unknown name falls through to the usual message about what a code needs.
            Err(stevedore_store::StoreError::NotFound { .. }) => {}
            Err(error) => return Err(error.into()),
        }
    }
    let spec = wire::code_spec(
        upload,
        package.is_some() || kept_package.is_some(),
        &state.config,
    )?;
    if let stevedore_model::CodeKind::Image { image, .. } = &spec.kind {
        state
            .config
            .code_images
            .check_owner(image, &access.project_id)?;
    }
    if let Some(package) = &package {
        package.check_entry_point(&spec.kind)?;
    }
    let revision_package = match (&package, &kept_package) {
        (Some(package), _) => Some(RevisionPackage::File(&package.file)),
        (None, Some(sha256)) => Some(RevisionPackage::Stored { sha256 }),
        (None, None) => None,
    };
    let code = state
        .store
        .push_code(
            &access.project_id,
            &spec,
            revision_package,
            state.clock.now(),
        )
        .await;
    // Forgotten whatever the answer: a push that failed after its commit changed the code.
    super::forget_code_defaults(&state, &access.project_id);
    let code = code?;
    // The spooled file goes only now, once the store has read what it needed.
    drop(package);
    tracing::info!(project_id = %access.project_id, code_id = %code.id, rev = code.rev, "code uploaded");
    Ok(Json(v2::CodeUploaded {
        id: code.id,
        rev: code.rev,
        msg: "Upload successful.".to_owned(),
    }))
}

/// Reads a code upload's form part by part, as it arrives: the `data` part's JSON (at most
/// `MAX_FORM_PART_BYTES`), the `file` part spooled to a temporary file (`UploadSpool`, at
/// most the package limit, then checked on a blocking thread), other parts read and dropped
/// (each at most `MAX_FORM_PART_BYTES`). No part is ever held whole beyond its small limit.
async fn read_multipart(
    request: Request,
    state: &AppState,
) -> ApiResult<(v2::CodeUpload, Option<CheckedPackage>)> {
    let mut multipart = Multipart::from_request(request, state)
        .await
        .map_err(|rejection| {
            ApiError::BadRequest(format!("invalid multipart body: {}", rejection.body_text()))
        })?;
    // The router's body limit for this route is this number, so the message names the point
    // where reading stopped.
    let limit = state.config.max_upload_bytes();
    let package_limit = state.config.package.max_bytes;
    let multipart_error = |error: axum::extract::multipart::MultipartError| {
        if error.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(format!(
                "the upload is larger than the limit of {limit} bytes (a code package of at most {package_limit} bytes and its form)"
            ))
        } else {
            ApiError::BadRequest(format!("invalid multipart body: {}", error.body_text()))
        }
    };
    let mut upload = None;
    let mut spooled = None;
    while let Some(mut field) = multipart.next_field().await.map_err(multipart_error)? {
        let name = field.name().unwrap_or_default().to_owned();
        let again = match name.as_str() {
            "data" => upload.is_some(),
            "file" => spooled.is_some(),
            _ => false,
        };
        if again {
            return Err(ApiError::BadRequest(format!(
                "the multipart body holds more than one `{name}` part"
            )));
        }
        if name == "file" {
            let mut spool =
                UploadSpool::create(&state.config.upload_dir, state.config.package).await?;
            while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
                spool.write(&chunk).await?;
            }
            spooled = Some(spool);
            continue;
        }
        // Only `data` is kept; other parts are read to pass them by.
        let mut data = Vec::new();
        let mut received = 0;
        while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
            received += chunk.len();
            if received > ServerConfig::MAX_FORM_PART_BYTES {
                return Err(ApiError::PayloadTooLarge(format!(
                    "the `{name}` part is larger than the limit of {} bytes",
                    ServerConfig::MAX_FORM_PART_BYTES
                )));
            }
            if name == "data" {
                data.extend_from_slice(&chunk);
            }
        }
        if name == "data" {
            upload = Some(parse_json::<v2::CodeUpload>(&data)?);
        }
    }
    let upload = upload.ok_or_else(|| {
        ApiError::BadRequest(
            "the multipart body needs a `data` part holding the code's JSON".into(),
        )
    })?;
    let package = match spooled {
        Some(spool) => Some(spool.finish().await?),
        None => None,
    };
    Ok((upload, package))
}

/// List codes, most recently changed first.
#[utoipa::path(get, path = "/2/projects/{project_id}/codes", tag = "codes",
    params(("project_id" = String, Path), Paging),
    responses((status = 200, body = v2::CodeList)))]
pub async fn list(
    State(state): State<AppState>,
    access: ProjectAccess,
    ApiQuery(paging): ApiQuery<Paging>,
) -> ApiResult<Json<v2::CodeList>> {
    let codes = state
        .store
        .list_codes(&access.project_id, paging.page()?)
        .await?;
    Ok(Json(v2::CodeList {
        codes: codes.iter().map(wire::code_info).collect(),
    }))
}

/// Show a code's latest revision.
#[utoipa::path(get, path = "/2/projects/{project_id}/codes/{code_id}", tag = "codes",
    params(("project_id" = String, Path), ("code_id" = String, Path)),
    responses((status = 200, body = v2::CodeInfo), (status = 404, body = v2::Message)))]
pub async fn show(
    State(state): State<AppState>,
    access: ProjectAccess,
    Path((_, code_id)): Path<(String, String)>,
) -> ApiResult<Json<v2::CodeInfo>> {
    let code = state.store.get_code(&access.project_id, &code_id).await?;
    Ok(Json(wire::code_info(&code)))
}

/// List a code's revisions, newest first.
#[utoipa::path(get, path = "/2/projects/{project_id}/codes/{code_id}/revisions", tag = "codes",
    params(("project_id" = String, Path), ("code_id" = String, Path), Paging),
    responses((status = 200, body = v2::RevisionList), (status = 404, body = v2::Message)))]
pub async fn revisions(
    State(state): State<AppState>,
    access: ProjectAccess,
    Path((_, code_id)): Path<(String, String)>,
    ApiQuery(paging): ApiQuery<Paging>,
) -> ApiResult<Json<v2::RevisionList>> {
    let revisions = state
        .store
        .list_revisions(&access.project_id, &code_id, paging.page()?)
        .await?;
    Ok(Json(v2::RevisionList {
        revisions: revisions.iter().map(wire::revision_info).collect(),
    }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct DownloadQuery {
    /// The revision to download; the latest when absent.
    pub revision: Option<u32>,
}

/// Download a revision's zip package.
#[utoipa::path(get, path = "/2/projects/{project_id}/codes/{code_id}/download", tag = "codes",
    params(("project_id" = String, Path), ("code_id" = String, Path), DownloadQuery),
    responses((status = 200, content_type = "application/zip", body = Vec<u8>), (status = 404, body = v2::Message)))]
pub async fn download(
    State(state): State<AppState>,
    access: ProjectAccess,
    Path((_, code_id)): Path<(String, String)>,
    ApiQuery(query): ApiQuery<DownloadQuery>,
) -> ApiResult<impl IntoResponse> {
    let code = match query.revision {
        Some(rev) => {
            state
                .store
                .get_revision(&access.project_id, &code_id, rev)
                .await?
        }
        None => state.store.get_code(&access.project_id, &code_id).await?,
    };
    let package = state
        .store
        .get_package(&access.project_id, &code_id, Some(code.rev))
        .await?;
    let (size, body) = crate::package::package_body(package);
    // IronWorker documents the name as `yourworker_rev.zip`.
    let file_name = format!(
        "{}_{}.zip",
        code.spec.name.replace(
            |c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '_',
            "_"
        ),
        code.rev
    );
    Ok((
        [
            (CONTENT_TYPE, "application/zip".to_owned()),
            (CONTENT_LENGTH, size.to_string()),
            (
                CONTENT_DISPOSITION,
                format!("attachment; filename=\"{file_name}\""),
            ),
        ],
        body,
    ))
}

/// Delete a code. Its queued tasks are cancelled; finished tasks stay readable.
#[utoipa::path(delete, path = "/2/projects/{project_id}/codes/{code_id}", tag = "codes",
    params(("project_id" = String, Path), ("code_id" = String, Path)),
    responses((status = 200, body = v2::Message), (status = 404, body = v2::Message)))]
pub async fn delete(
    State(state): State<AppState>,
    access: ProjectAccess,
    Path((_, code_id)): Path<(String, String)>,
) -> ApiResult<Json<v2::Message>> {
    let cancellation = state
        .store
        .delete_code(&access.project_id, &code_id, state.clock.now())
        .await;
    super::forget_code_defaults(&state, &access.project_id);
    let cancellation = cancellation?;
    record_cancelled(&cancellation);
    Ok(message("Deleted"))
}

/// Cancel every queued and running task of a code.
#[utoipa::path(post, path = "/2/projects/{project_id}/codes/{code_id}/cancel_all", tag = "codes",
    params(("project_id" = String, Path), ("code_id" = String, Path)),
    responses((status = 200, body = v2::Message), (status = 404, body = v2::Message)))]
pub async fn cancel_all(
    State(state): State<AppState>,
    access: ProjectAccess,
    Path((_, code_id)): Path<(String, String)>,
) -> ApiResult<Json<v2::Message>> {
    let cancellation = state
        .store
        .cancel_all(&access.project_id, &code_id, state.clock.now())
        .await?;
    record_cancelled(&cancellation);
    Ok(message(format!(
        "Cancelled {} tasks",
        cancellation.touched()
    )))
}

/// Counts the queued tasks a cancellation ended. Those it only asked to cancel are counted
/// when their runners complete them.
fn record_cancelled(cancellation: &CodeCancellation) {
    stevedore_metrics::tasks_finished(
        TaskStatus::Cancelled,
        &cancellation.code_name,
        cancellation.cancelled,
    );
}

/// Pause a code's task queue: its queued tasks wait until it is resumed.
#[utoipa::path(post, path = "/2/projects/{project_id}/codes/{code_id}/pause_task_queue", tag = "codes",
    params(("project_id" = String, Path), ("code_id" = String, Path)),
    responses((status = 200, body = v2::Message), (status = 404, body = v2::Message)))]
pub async fn pause(
    State(state): State<AppState>,
    access: ProjectAccess,
    Path((_, code_id)): Path<(String, String)>,
) -> ApiResult<Json<v2::Message>> {
    set_paused(&state, &access, &code_id, true).await?;
    Ok(message("Paused"))
}

/// Resume a paused task queue.
#[utoipa::path(post, path = "/2/projects/{project_id}/codes/{code_id}/resume_task_queue", tag = "codes",
    params(("project_id" = String, Path), ("code_id" = String, Path)),
    responses((status = 200, body = v2::Message), (status = 404, body = v2::Message)))]
pub async fn resume(
    State(state): State<AppState>,
    access: ProjectAccess,
    Path((_, code_id)): Path<(String, String)>,
) -> ApiResult<Json<v2::Message>> {
    set_paused(&state, &access, &code_id, false).await?;
    Ok(message("Resumed"))
}

async fn set_paused(
    state: &AppState,
    access: &ProjectAccess,
    code_id: &str,
    paused: bool,
) -> ApiResult<()> {
    state
        .store
        .set_code_paused(&access.project_id, code_id, paused, state.clock.now())
        .await?;
    Ok(())
}

/// `GET codes/{id}/stats` filters, as IronWorker documents them: seconds since the epoch.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
pub struct StatsQuery {
    /// Count only tasks last changed at or after this time.
    pub start_date: Option<i64>,
    /// Count only tasks last changed at or before this time.
    pub end_date: Option<i64>,
}

/// Task counts of a code by status.
#[utoipa::path(get, path = "/2/projects/{project_id}/codes/{code_id}/stats", tag = "codes",
    params(("project_id" = String, Path), ("code_id" = String, Path), StatsQuery),
    responses((status = 200, body = v2::CodeStats), (status = 400, body = v2::Message), (status = 404, body = v2::Message)))]
pub async fn stats(
    State(state): State<AppState>,
    access: ProjectAccess,
    Path((_, code_id)): Path<(String, String)>,
    ApiQuery(query): ApiQuery<StatsQuery>,
) -> ApiResult<Json<v2::CodeStats>> {
    let time = |field: &str, seconds: Option<i64>| {
        seconds
            .map(|seconds| wire::parse_time(field, &serde_json::Value::from(seconds)))
            .transpose()
    };
    let window = StatsWindow {
        updated_from: time("start_date", query.start_date)?,
        updated_to: time("end_date", query.end_date)?,
    };
    let counts = state
        .store
        .code_stats(&access.project_id, &code_id, window)
        .await?;
    Ok(Json(wire::code_stats(counts)))
}
