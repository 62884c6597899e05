// The HTTP API client: JSON in and out, the bearer token, and errors in the API's one shape
// `{"error": {"code", "message", "field"?, "job_id"?}}`.

import * as auth from './auth.js';

export class ApiError extends Error {
  constructor(status, detail = {}, retryAfter = null) {
    super(detail.message || `The service answered ${status}.`);
    this.status = status;
    this.code = detail.code || 'error';
    this.field = detail.field || null;
    this.jobId = detail.job_id || null;
    this.retryAfter = retryAfter;
  }
}

/** Request `path`; resolves to `{data, headers}` or throws an ApiError. */
export async function request(method, path, body) {
  const headers = { Accept: 'application/json' };
  const jwt = auth.token();
  if (jwt) headers.Authorization = `Bearer ${jwt}`;
  const init = { method, headers, cache: 'no-store' };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch {
    throw new ApiError(0, {
      code: 'network',
      message: 'Could not reach the Tradeeon service. Check your connection and try again.',
    });
  }
  const text = await response.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!response.ok) {
    const detail = data?.error ?? {};
    const retryAfter = Number(response.headers.get('Retry-After')) || null;
    const error = new ApiError(response.status, detail, retryAfter);
    if (response.status === 401) auth.rejected(error.message);
    throw error;
  }
  return { data, headers: response.headers };
}

export const get = async (path) => (await request('GET', path)).data;
export const post = async (path, body) => (await request('POST', path, body)).data;
export const del = async (path) => (await request('DELETE', path)).data;

/** The `rel="next"` target of a `Link` header, if any. */
export function nextLink(headers) {
  const link = headers.get('Link');
  if (!link) return null;
  for (const part of link.split(',')) {
    const match = part.match(/<([^>]+)>\s*;\s*rel="?next"?/);
    if (match) return match[1];
  }
  return null;
}
