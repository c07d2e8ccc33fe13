/**
 * longdl-client.js: a small client for longdl's download API. ES module, no dependencies.
 *
 * Served by longdl at /ui/longdl-client.js; copy it into your app as it is.
 *
 *   import { initiate, watch, cancel, resultUrl, describe } from "./longdl-client.js";
 *
 *   const job = await initiate([70000, 70007]);          // 202 at once, with the job id
 *   const stop = watch(job, ({ job, connection }) => {    // live updates until it finishes
 *     if (job) console.log(job.status, job.progress.percent, connection);
 *     if (job && describe(job).canDownload) location.href = resultUrl(job);
 *   });
 *   // stop() ends watching early; cancel(job.jobId) cancels the job itself.
 *
 * watch() listens to the job's Server-Sent Events stream and falls back to polling the
 * status URL (honouring nextPollInMs / Retry-After) when SSE is unavailable or keeps
 * failing; network errors are retried with exponential backoff and full jitter.
 *
 * Every function takes an options object: `baseUrl` (default: the page's origin),
 * `token` (sent as `Authorization: Bearer`; EventSource cannot send it, so watch() polls
 * when a token is set), `fetch` and `EventSource` (to substitute implementations).
 */

/** Statuses a job never leaves (except to expire). */
export const FINISHED_STATUSES = Object.freeze(["completed", "failed", "canceled", "expired"]);
export const MIN_FILE_ID = 10000;
export const MAX_FILE_ID = 100000000;
export const MAX_FILES_PER_JOB = 1000;

/** Event types of the events stream that carry the job resource. */
const STREAM_EVENTS = ["snapshot", "progress", "status"];
/** Consecutive failed SSE (re)connections before watch() switches to polling. */
const SSE_MAX_FAILURES = 3;
/** Times watch() goes back from polling to SSE without an event arriving in between. */
const SSE_MAX_FALLBACKS = 3;

/** An error from the service (a problem+json response) or from the network. */
export class LongdlError extends Error {
  /**
   * @param {string} message human-readable, the problem's `detail` when there is one
   * @param {{status?: number, code?: string|null, problem?: object|null,
   *          network?: boolean, retryAfterMs?: number|null}} [info]
   */
  constructor(message, info = {}) {
    super(message);
    this.name = "LongdlError";
    this.status = info.status ?? 0;
    this.code = info.code ?? null;
    this.problem = info.problem ?? null;
    this.network = info.network ?? false;
    this.retryAfterMs = info.retryAfterMs ?? null;
  }

  /** True when trying again later may succeed (network, 408, 425, 429, 5xx). */
  get transient() {
    return this.network || [408, 425, 429].includes(this.status) || this.status >= 500;
  }
}

/** True for a status the job never leaves. */
export function isFinished(status) {
  return FINISHED_STATUSES.includes(status);
}

/**
 * Parse what a person typed ("70000 70007, 70014") into file ids.
 * @param {string} text
 * @returns {{ids: number[], errors: string[]}} ids without duplicates, in order; errors
 *   are sentences to show as they are
 */
export function parseFileIds(text) {
  const tokens = String(text ?? "")
    .split(/[\s,;]+/)
    .filter(Boolean);
  const errors = [];
  const ids = [];
  if (tokens.length === 0) {
    errors.push("Enter at least one file id.");
  }
  for (const token of tokens) {
    if (!/^\d+$/.test(token)) {
      errors.push(`“${token.slice(0, 20)}” is not a file id: use whole numbers only.`);
      continue;
    }
    const id = Number(token);
    if (id < MIN_FILE_ID || id > MAX_FILE_ID) {
      errors.push(`${token} is out of range: file ids go from ${MIN_FILE_ID} to ${MAX_FILE_ID}.`);
      continue;
    }
    if (!ids.includes(id)) ids.push(id);
  }
  if (ids.length > MAX_FILES_PER_JOB) {
    errors.push(`At most ${MAX_FILES_PER_JOB} files per download (you entered ${ids.length}).`);
  }
  return { ids, errors };
}

/**
 * Backoff before retry number `attempt` (1, 2, …): exponential with full jitter.
 * @returns {number} milliseconds
 */
export function backoffMs(attempt, { baseMs = 500, capMs = 15000, random = Math.random } = {}) {
  const ceiling = Math.min(capMs, baseMs * 2 ** Math.max(0, attempt - 1));
  return Math.round(ceiling / 2 + (random() * ceiling) / 2);
}

function jobIdOf(job) {
  return typeof job === "string" ? job : job.jobId;
}

function absolute(path, baseUrl) {
  return baseUrl ? new URL(path, baseUrl).href : path;
}

/** The status route of a job (id or resource). */
export function statusUrl(job, { baseUrl } = {}) {
  return absolute(job.statusUrl ?? job.links?.self ?? `/v1/download/status/${jobIdOf(job)}`, baseUrl);
}

/** The events (SSE) route of a job. */
export function eventsUrl(job, { baseUrl } = {}) {
  return absolute(job.eventsUrl ?? job.links?.events ?? `/v1/download/${jobIdOf(job)}/events`, baseUrl);
}

/**
 * The result route of a job: a link to it downloads the file once the job completed
 * (it redirects to a freshly signed URL, so the link never goes stale).
 */
export function resultUrl(job, { baseUrl } = {}) {
  return absolute(job.resultUrl ?? job.links?.result ?? `/v1/download/${jobIdOf(job)}`, baseUrl);
}

/**
 * A freshly signed URL of a completed job's file, for callers that cannot follow the
 * result route as a plain link (it needs `Authorization` when the service has API keys).
 * @returns {Promise<{url: string, expiresAt: string, filename: string, size: number}>}
 */
export async function resultLink(job, opts = {}) {
  const { data } = await request("GET", withQuery(resultUrl(job, opts), "redirect", "false"), opts);
  return data;
}

function retryAfterMs(response) {
  const value = response.headers.get("Retry-After");
  if (!value) return null;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return Math.max(0, seconds * 1000);
  const date = Date.parse(value);
  return Number.isNaN(date) ? null : Math.max(0, date - Date.now());
}

async function request(method, path, { baseUrl, token, signal, body, headers, fetch: fetchImpl } = {}) {
  const doFetch = fetchImpl ?? globalThis.fetch.bind(globalThis);
  const sent = { Accept: "application/json", ...headers };
  if (token) sent.Authorization = `Bearer ${token}`;
  if (body !== undefined) sent["Content-Type"] = "application/json";
  let response;
  try {
    response = await doFetch(absolute(path, baseUrl), {
      method,
      headers: sent,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: "no-store",
    });
  } catch (error) {
    if (error?.name === "AbortError") throw error;
    throw new LongdlError("The service cannot be reached. Check your connection.", { network: true });
  }
  let data = null;
  const text = await response.text().catch(() => "");
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const message = data?.detail || data?.title || `The service answered ${response.status}.`;
    throw new LongdlError(message, {
      status: response.status,
      code: data?.code ?? null,
      problem: data,
      retryAfterMs: retryAfterMs(response),
    });
  }
  return { data, response };
}

function randomId() {
  if (globalThis.crypto?.randomUUID) return globalThis.crypto.randomUUID();
  // randomUUID needs a secure context; plain http on a LAN address is not one.
  const bytes = globalThis.crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      reject(signal.reason ?? new DOMException("Aborted", "AbortError"));
    });
  });
}

/**
 * Start a download job.
 *
 * Network errors, 429 and 503 are retried with backoff: the request carries a
 * `clientRequestId`, so the service answers a repeat with the same job, never a second.
 *
 * @param {number[]} fileIds
 * @param {{baseUrl?: string, token?: string, priority?: "low"|"normal"|"high",
 *          userId?: string, strict?: boolean, clientRequestId?: string,
 *          retries?: number, signal?: AbortSignal,
 *          onRetry?: (error: LongdlError, delayMs: number, attempt: number) => void}} [opts]
 * @returns {Promise<object>} the 202 body: jobId, status, statusUrl, eventsUrl, resultUrl, …
 */
export async function initiate(fileIds, opts = {}) {
  const body = { file_ids: fileIds, clientRequestId: opts.clientRequestId ?? randomId() };
  for (const key of ["priority", "userId", "strict"]) {
    if (opts[key] !== undefined) body[key] = opts[key];
  }
  const retries = opts.retries ?? 4;
  for (let attempt = 1; ; attempt += 1) {
    try {
      const { data } = await request("POST", "/v1/download/initiate", { ...opts, body });
      return data;
    } catch (error) {
      if (!(error instanceof LongdlError) || !error.transient || attempt > retries) throw error;
      const delayMs = error.retryAfterMs ?? backoffMs(attempt);
      opts.onRetry?.(error, delayMs, attempt);
      await sleep(delayMs, opts.signal);
    }
  }
}

/** The job resource as it is now. */
export async function getJob(job, opts = {}) {
  const { data } = await request("GET", statusUrl(job), opts);
  return data;
}

/**
 * Cancel a queued or running job.
 * @returns {Promise<object>} the job resource, status "canceled"
 * @throws {LongdlError} status 409 when the job already finished
 */
export async function cancel(job, opts = {}) {
  const { data } = await request("POST", `/v1/download/cancel/${jobIdOf(job)}`, opts);
  return data;
}

/**
 * What a job's state means for a person: labels and which actions make sense.
 * @param {object} job the job resource
 */
export function describe(job) {
  const status = job.status;
  const labels = {
    queued: "Queued",
    running: "Preparing",
    processing_artifacts: "Bundling",
    completed: "Ready",
    failed: "Failed",
    canceled: "Canceled",
    expired: "Expired",
  };
  const finished = isFinished(status);
  return {
    status,
    label: labels[status] ?? status,
    finished,
    percent: Math.max(0, Math.min(100, Number(job.progress?.percent ?? 0))),
    message: job.progress?.message ?? "",
    /** Work is under way but has not measured progress yet. */
    indeterminate: status === "running" && !(job.progress?.percent > 0),
    canCancel: !finished,
    canDownload: status === "completed",
    canRetry: status === "failed" || status === "canceled" || status === "expired",
    reason: status === "failed" ? (job.error?.message ?? "The download failed.") : null,
    missing: job.result?.missing ?? [],
    sizeBytes: job.result?.size ?? null,
  };
}

/**
 * Elapsed time and a rough time left, extrapolated from the last update.
 * @param {object} job the job resource
 * @param {number} receivedAtMs when the resource arrived (Date.now() then)
 * @param {number} [nowMs]
 * @returns {{elapsedS: number|null, etaS: number|null}}
 */
export function estimate(job, receivedAtMs, nowMs = Date.now()) {
  if (!job.timestamps?.startedAt) return { elapsedS: null, etaS: null };
  const since = isFinished(job.status) ? 0 : Math.max(0, nowMs - receivedAtMs) / 1000;
  const elapsedS = Number(job.elapsedSeconds ?? 0) + since;
  const percent = Number(job.progress?.percent ?? 0);
  // Extrapolating from the first instants gives wild guesses; wait for a little history.
  const measurable = !isFinished(job.status) && percent > 0 && percent < 100 && elapsedS >= 2;
  const etaS = measurable ? Math.max(0, (elapsedS * (100 - percent)) / percent) : null;
  return { elapsedS, etaS };
}

function withQuery(url, name, value) {
  const sep = url.includes("?") ? "&" : "?";
  return `${url}${sep}${encodeURIComponent(name)}=${encodeURIComponent(value)}`;
}

/** Event streams open on this page, across every watch(). */
let openStreams = 0;

/**
 * Follow a job until it finishes: Server-Sent Events, falling back to polling.
 *
 * `onUpdate` gets `{job, connection, transport, error, retryInMs}` whenever the job
 * changes or the connection does:
 * - `job`: the latest job resource (null until the first one arrives);
 * - `connection`: "connecting", "live", "reconnecting" (a network error; retrying with
 *   backoff) or "closed" (finished, stopped, or the job is gone: see `error`);
 * - `transport`: "sse" or "poll".
 *
 * Browsers open at most six HTTP/1.1 connections per host, so at most `maxStreams`
 * (default 4) event streams are open on a page at once; further jobs are polled until a
 * stream frees up, leaving connections for the page's other requests. A stream silent
 * for `stallMs` (default 65 s; the server ends streams every 50 s) is taken for dead.
 *
 * @param {string|object} job a job id, the 202 body of initiate(), or a job resource
 * @param {(update: object) => void} onUpdate
 * @param {{baseUrl?: string, token?: string, transport?: "auto"|"sse"|"poll",
 *          maxStreams?: number, stallMs?: number,
 *          fetch?: Function, EventSource?: Function}} [opts]
 * @returns {() => void} stop: ends watching (idempotent)
 */
export function watch(job, onUpdate, opts = {}) {
  const EventSourceImpl = opts.EventSource ?? globalThis.EventSource;
  const maxStreams = opts.maxStreams ?? 4;
  const stallMs = opts.stallMs ?? 65000;
  const events = eventsUrl(job, opts);
  const status = statusUrl(job, opts);
  let current = typeof job === "object" && job.progress ? job : null;
  let connection = "connecting";
  let transport = null;
  let stopped = false;
  let source = null;
  let timer = null;
  let stallTimer = null;
  let controller = null;
  let lastEventId = null;
  let sseFailures = 0;
  let sseWorked = false;
  let sseFallbacks = 0;
  let pollFailures = 0;
  // Browsers' EventSource cannot send a token, so with one, watch() polls.
  let sseUsable = Boolean(EventSourceImpl) && opts.transport !== "poll" && !opts.token;

  const canStream = () => sseUsable && openStreams < maxStreams;

  const emit = (extra = {}) => {
    if (!stopped) {
      onUpdate({ job: current, connection, transport, error: null, retryInMs: null, ...extra });
    }
  };

  const schedule = (fn, delayMs) => {
    clearTimeout(timer);
    timer = setTimeout(fn, delayMs);
  };

  function closeSource() {
    clearTimeout(stallTimer);
    if (source) {
      source.close();
      source = null;
      openStreams -= 1;
    }
  }

  function stop() {
    if (stopped) return;
    stopped = true;
    closeSource();
    clearTimeout(timer);
    controller?.abort();
    globalThis.removeEventListener?.("online", onOnline);
  }

  function close(extra = {}) {
    connection = "closed";
    emit(extra);
    stop();
  }

  function received(next) {
    current = next;
    connection = "live";
    if (isFinished(next.status)) {
      close();
    } else {
      emit();
    }
  }

  /** Poll instead of streaming; go back to SSE later only if it worked before. */
  function fallBack(failuresSoFar) {
    closeSource();
    sseFallbacks += 1;
    sseUsable = sseWorked && sseFallbacks < SSE_MAX_FALLBACKS;
    poll(failuresSoFar);
  }

  /** Any sign of life from the stream pushes the stall deadline back. */
  function alive() {
    clearTimeout(stallTimer);
    stallTimer = setTimeout(() => {
      if (!stopped && source) fallBack(1);
    }, stallMs);
  }

  function startSse() {
    closeSource();
    transport = "sse";
    const url = lastEventId ? withQuery(events, "lastEventId", lastEventId) : events;
    const es = new EventSourceImpl(url, { withCredentials: Boolean(opts.withCredentials) });
    source = es;
    openStreams += 1;
    alive();
    es.onopen = () => {
      sseFailures = 0;
      sseWorked = true;
      alive();
      if (connection !== "live") {
        connection = "live";
        emit();
      }
    };
    const onEvent = (event) => {
      if (event.lastEventId) lastEventId = event.lastEventId;
      sseFallbacks = 0;
      alive();
      let next;
      try {
        next = JSON.parse(event.data);
      } catch {
        return;
      }
      received(next);
    };
    for (const type of STREAM_EVENTS) es.addEventListener(type, onEvent);
    es.onerror = () => {
      if (stopped || source !== es) return;
      if (es.readyState === 2 /* CLOSED: an HTTP error or not an event stream */) {
        fallBack(0);
        return;
      }
      // The browser reconnects by itself (the stream's lifetime ended, or a network blip).
      sseFailures += 1;
      if (sseFailures >= 2 && connection !== "reconnecting") {
        connection = "reconnecting";
        emit();
      }
      if (sseFailures >= SSE_MAX_FAILURES) fallBack(1);
    };
  }

  async function poll(failuresSoFar = 0) {
    if (stopped) return;
    pollFailures = Math.max(pollFailures, failuresSoFar);
    transport = "poll";
    controller = new AbortController();
    try {
      const { data, response } = await request("GET", status, { ...opts, signal: controller.signal });
      if (stopped) return;
      pollFailures = 0;
      received(data);
      if (stopped) return;
      if (canStream()) {
        startSse();
        return;
      }
      schedule(poll, data.nextPollInMs ?? retryAfterMs(response) ?? 2000);
    } catch (error) {
      if (stopped || error?.name === "AbortError") return;
      if (error instanceof LongdlError && !error.transient) {
        close({ error });
        return;
      }
      pollFailures += 1;
      const delayMs = error.retryAfterMs ?? backoffMs(pollFailures);
      connection = "reconnecting";
      emit({ error, retryInMs: delayMs });
      schedule(poll, delayMs);
    }
  }

  // Back online: try at once instead of waiting out the backoff.
  function onOnline() {
    if (!stopped && connection === "reconnecting" && !source) schedule(poll, 0);
  }
  globalThis.addEventListener?.("online", onOnline);

  if (current && isFinished(current.status)) {
    connection = "live";
    queueMicrotask(() => close());
  } else if (canStream()) {
    startSse();
  } else {
    queueMicrotask(() => poll());
  }
  return stop;
}
