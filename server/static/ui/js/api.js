// The one module that talks to the server. Every call goes through the public REST API (the same routes
// the Python client uses); the API key lives in sessionStorage (this tab only, never in a URL) and is sent
// as a bearer token. Answers are read leniently: fields the server adds later are simply passed along.

const KEY_STORAGE = "laser-serve.api-key";
/** The server root: this file is served from <root>/ui/js/api.js, so a reverse-proxy prefix keeps working. */
const ROOT = new URL("../../", import.meta.url);

export class ApiError extends Error {
  /** @param {number} status HTTP status (0 for an error reported inside a stream) */
  constructor(status, message, body = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.body = body;
  }

  /** True for a missing/invalid key (401) or a key without the needed scope (403). */
  get isAuth() {
    return this.status === 401 || this.status === 403;
  }
}

// -- API key -----------------------------------------------------------------------------------------

export function getKey() {
  try {
    return sessionStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return "";  // storage disabled: behave as if no key was entered
  }
}

export function setKey(key) {
  try {
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
  } catch {
    /* storage disabled: the key cannot be kept */
  }
}

const authListeners = new Set();

/** ``fn(error)`` runs on every 401/403 answer (the app shows its key banner). */
export function onAuthError(fn) {
  authListeners.add(fn);
  return () => authListeners.delete(fn);
}

// -- plumbing ------------------------------------------------------------------------------------------

function url(path, query) {
  const u = new URL(path.replace(/^\//, ""), ROOT);
  for (const [k, v] of Object.entries(query || {})) {
    if (v !== undefined && v !== null && v !== "") u.searchParams.set(k, String(v));
  }
  return u;
}

function headers(json, accept = "application/json") {
  const h = { Accept: accept };
  if (json) h["Content-Type"] = "application/json";
  const key = getKey();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

/** One readable line from any error body the server sends (FastAPI detail list, plain detail, OpenAI error). */
export function describeError(body) {
  if (!body) return "";
  if (typeof body === "string") return body;
  if (body.error && typeof body.error === "object") return body.error.message || JSON.stringify(body.error);
  if (typeof body.error === "string") return body.error;
  const d = body.detail;
  if (typeof d === "string") return d;
  if (Array.isArray(d)) {
    return d.map((e) => {
      const loc = (e.loc || []).filter((p) => p !== "body" && p !== "query" && p !== "path").join(".");
      return loc ? `${loc}: ${e.msg}` : e.msg;
    }).join("; ");
  }
  return "";
}

async function errorFrom(res) {
  let body = null;
  try {
    body = await res.json();
  } catch {
    /* not JSON */
  }
  const err = new ApiError(res.status, describeError(body) || `${res.status} ${res.statusText}`, body);
  if (err.isAuth) for (const fn of authListeners) fn(err);
  return err;
}

async function request(method, path, { body, query, signal } = {}) {
  const res = await fetch(url(path, query), {
    method,
    headers: headers(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
  });
  if (!res.ok) throw await errorFrom(res);
  return res.json();
}

/** Server-Sent Events of a fetch response: yields ``{event, data}`` (data lines joined); comments skipped. */
async function* sse(res) {
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replace(/\r\n/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let event = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (!line || line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let value = colon < 0 ? "" : line.slice(colon + 1);
          if (value.startsWith(" ")) value = value.slice(1);
          if (field === "event") event = value;
          else if (field === "data") data.push(value);
        }
        if (data.length) yield { event, data: data.join("\n") };
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

async function openStream(method, path, { body, signal } = {}) {
  const res = await fetch(url(path), {
    method,
    headers: headers(body !== undefined, "text/event-stream"),
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
  });
  if (!res.ok) throw await errorFrom(res);
  return res;
}

// -- system --------------------------------------------------------------------------------------------

/** The loaded model: id, architecture, layers, LASER types with shapes, groups, device, version (no key). */
export const info = (opts) => request("GET", "/info", opts);

// -- profiles ------------------------------------------------------------------------------------------

export const listProfiles = async (opts) => (await request("GET", "/v1/profiles", opts)).data;
export const createProfile = (profile, opts) => request("POST", "/v1/profiles", { ...opts, body: profile });
/** Per-matrix k, retained energy and Frobenius error of a profile, nothing stored. */
export const dryRunProfile = (profile, opts) =>
  request("POST", "/v1/profiles", { ...opts, body: profile, query: { dry_run: "true" } });
export const deleteProfile = (name, opts) => request("DELETE", `/v1/profiles/${encodeURIComponent(name)}`, opts);
/** Singular values of one base matrix with its Marchenko-Pastur threshold (and k's figures when given). */
export const spectrum = (type, layer, k, opts) =>
  request("GET", `/v1/spectrum/${encodeURIComponent(type)}/${encodeURIComponent(layer)}`, { ...opts, query: { k } });

// -- inference -----------------------------------------------------------------------------------------

/**
 * Stream one generation: yields each event (``{profile, text, finish_reason?, usage?, ...}``); a failure the
 * server reports inside the stream is thrown as an ApiError. ``onOpen(response)`` sees the headers.
 */
export async function* generateStream(profile, params, { signal, onOpen } = {}) {
  const res = await openStream("POST", "/v1/generate", { body: { ...params, profile, stream: true }, signal });
  if (onOpen) onOpen(res);
  for await (const { data } of sse(res)) {
    if (data === "[DONE]") return;
    const event = JSON.parse(data);
    if (event.error) throw new ApiError(0, typeof event.error === "string" ? event.error : describeError(event));
    yield event;
  }
}

/** The same score request on several profiles: per profile its log-probs and argmax, and the diff. */
export const compareScore = (profiles, score, opts) =>
  request("POST", "/v1/compare", { ...opts, body: { profiles, score } });

/**
 * Per-token log-probs of whole texts under one profile (OpenAI completions with echo, nothing generated):
 * returns, per text, ``{tokens, logprobs}`` aligned one to one (the first token's log-prob is null).
 */
export async function tokenLogprobs(profile, texts, opts) {
  const res = await request("POST", "/v1/completions", {
    ...opts, body: { model: profile, prompt: texts, max_tokens: 0, echo: true, logprobs: 0, temperature: 0 },
  });
  return [...res.choices].sort((a, b) => a.index - b.index).map((c) => ({
    tokens: c.logprobs?.tokens || [],
    logprobs: c.logprobs?.token_logprobs || [],
  }));
}

// -- datasets and sweeps --------------------------------------------------------------------------------

export const listDatasets = async (opts) => (await request("GET", "/v1/datasets", opts)).data;
export const uploadDataset = (dataset, opts) => request("POST", "/v1/datasets", { ...opts, body: dataset });
export const startSweep = (config, opts) => request("POST", "/v1/jobs/sweeps", { ...opts, body: config });
export const listJobs = async (opts) => (await request("GET", "/v1/jobs", opts)).data;
export const getJob = (id, opts) => request("GET", `/v1/jobs/${encodeURIComponent(id)}`, opts);
export const cancelJob = (id, opts) => request("DELETE", `/v1/jobs/${encodeURIComponent(id)}`, opts);
export const promoteJob = (id, body, opts) =>
  request("POST", `/v1/jobs/${encodeURIComponent(id)}/promote`, { ...opts, body });

/** A job's progress events (``{event, ...JobProgress}``): a snapshot, one per step, then its final state. */
export async function* jobEvents(id, { signal } = {}) {
  const res = await openStream("GET", `/v1/jobs/${encodeURIComponent(id)}/events`, { signal });
  for await (const { event, data } of sse(res)) yield { event, ...JSON.parse(data) };
}
