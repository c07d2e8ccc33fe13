// The download manager page: DOM only. Job state, transport and retries live in
// longdl-client.js, which this page uses exactly as any other app would.
import * as longdl from "./longdl-client.js";

const STORAGE_KEY = "longdl.jobs.v1";
const API_KEY_STORAGE = "longdl.apiKey.v1";
const MAX_SAVED_JOBS = 50;
const TITLE_IDS = 4;

const form = document.getElementById("start-form");
const input = document.getElementById("file-ids");
const startButton = document.getElementById("start");
const formError = document.getElementById("file-ids-error");
const list = document.getElementById("jobs");
const empty = document.getElementById("empty");
const clearFinished = document.getElementById("clear-finished");
const announcer = document.getElementById("announcer");
const template = document.getElementById("job-template");
const keyPanel = document.getElementById("key-panel");
const keyForm = document.getElementById("key-form");
const keyInput = document.getElementById("api-key");
const keyError = document.getElementById("api-key-error");
const forgetKeyItem = document.getElementById("forget-key-item");
const forgetKey = document.getElementById("forget-key");

/** jobId -> {jobId, fileIds, job, receivedAt, connection, error, stop, el, parts} */
const entries = new Map();

// --- persistence ---------------------------------------------------------------------

function loadSaved() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORAGE_KEY) ?? "[]");
    return Array.isArray(saved) ? saved.filter((s) => typeof s?.jobId === "string") : [];
  } catch {
    return [];
  }
}

function save() {
  // Newest first, as on screen.
  const saved = [...entries.values()]
    .reverse()
    .slice(0, MAX_SAVED_JOBS)
    .map(({ jobId, fileIds }) => ({ jobId, fileIds }));
  try {
    localStorage.setItem(STORAGE_KEY, JSON.stringify(saved));
  } catch {
    // Private mode or a full quota: the page still works, it just will not remember.
  }
}

// --- API key -------------------------------------------------------------------------
// A service with API_KEYS answers 401 until the page sends a key. The key lives in this
// browser's localStorage and goes out only as an Authorization header (never in a URL).

function storedKey() {
  try {
    return localStorage.getItem(API_KEY_STORAGE) ?? "";
  } catch {
    return "";
  }
}

let apiKey = storedKey();

/** Options every call to the service takes: the key, when there is one. */
function auth() {
  return apiKey ? { token: apiKey } : {};
}

function isUnauthorized(error) {
  return error?.status === 401;
}

function askForKey(message) {
  keyPanel.hidden = false;
  keyError.textContent = apiKey ? `The saved key was refused: ${message}` : "";
  keyInput.setAttribute("aria-invalid", apiKey ? "true" : "false");
  document.getElementById("key-heading").focus();
}

function setKey(value) {
  apiKey = value;
  try {
    if (value) localStorage.setItem(API_KEY_STORAGE, value);
    else localStorage.removeItem(API_KEY_STORAGE);
  } catch {
    // Private mode: the key lasts as long as the page.
  }
  forgetKeyItem.hidden = !value;
}

// --- formatting ----------------------------------------------------------------------

function formatDuration(seconds) {
  if (seconds == null || !Number.isFinite(seconds)) return "–";
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s`;
  return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")} min`;
}

function formatBytes(bytes) {
  if (bytes == null) return "";
  const units = ["bytes", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${value} bytes` : `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`;
}

function titleOf(fileIds) {
  if (!fileIds?.length) return "Download";
  const shown = fileIds.slice(0, TITLE_IDS).join(", ");
  const more = fileIds.length - TITLE_IDS;
  const noun = fileIds.length === 1 ? "File" : "Files";
  return more > 0 ? `${noun} ${shown} and ${more} more` : `${noun} ${shown}`;
}

function announce(text) {
  // Clearing first makes screen readers repeat an identical message.
  announcer.textContent = "";
  requestAnimationFrame(() => {
    announcer.textContent = text;
  });
}

// --- cards ---------------------------------------------------------------------------

function createCard(entry) {
  const el = template.content.firstElementChild.cloneNode(true);
  const q = (selector) => el.querySelector(selector);
  const parts = {
    title: q(".card-title"),
    badge: q(".badge"),
    jobId: q(".job-id"),
    bar: q(".bar"),
    message: q(".message"),
    elapsed: q(".elapsed"),
    eta: q(".eta"),
    sizeRow: q(".size-row"),
    size: q(".size"),
    reason: q(".reason"),
    connection: q(".connection"),
    connectionText: q(".connection-text"),
    download: q(".download"),
    cancel: q(".cancel"),
    retry: q(".retry"),
    remove: q(".remove"),
  };
  const titleId = `job-${entry.jobId}-title`;
  el.dataset.jobId = entry.jobId;
  parts.title.id = titleId;
  parts.title.textContent = titleOf(entry.fileIds);
  el.querySelector("article").setAttribute("aria-labelledby", titleId);
  parts.jobId.textContent = `Job ${entry.jobId.slice(0, 8)}`;
  parts.jobId.title = entry.jobId;
  parts.bar.setAttribute("aria-labelledby", titleId);
  parts.download.href = longdl.resultUrl(entry.jobId);
  parts.download.setAttribute("download", "");
  parts.download.setAttribute("aria-label", `Download ${titleOf(entry.fileIds)}`);
  parts.cancel.setAttribute("aria-label", `Cancel ${titleOf(entry.fileIds)}`);
  parts.retry.setAttribute("aria-label", `Retry ${titleOf(entry.fileIds)}`);
  parts.remove.setAttribute("aria-label", `Remove ${titleOf(entry.fileIds)} from the list`);
  parts.download.addEventListener("click", (event) => downloadWithKey(event, entry));
  parts.cancel.addEventListener("click", () => cancelJob(entry));
  parts.retry.addEventListener("click", () => retryJob(entry));
  parts.remove.addEventListener("click", () => removeEntry(entry, { focus: true }));
  entry.el = el;
  entry.parts = parts;
}

function render(entry) {
  const { el, parts, job } = entry;
  if (entry.gone) {
    el.dataset.status = "gone";
    parts.badge.textContent = "Unavailable";
    parts.message.textContent = "";
    parts.reason.hidden = false;
    parts.reason.textContent = entry.goneReason;
    parts.bar.hidden = true;
    parts.cancel.hidden = true;
    parts.download.hidden = true;
    parts.retry.hidden = !entry.fileIds?.length;
    parts.remove.hidden = false;
    parts.connection.hidden = true;
    return;
  }
  if (!job) {
    parts.badge.textContent = entry.awaitingKey ? "Locked" : "Connecting";
    parts.message.textContent = entry.awaitingKey
      ? "Waiting for an API key to show this download."
      : "Fetching the job's state…";
    parts.bar.removeAttribute("value");
    renderConnection(entry);
    return;
  }
  const state = longdl.describe(job);
  el.dataset.status = state.status;
  parts.badge.textContent = state.label;
  if (state.indeterminate) {
    parts.bar.removeAttribute("value");
  } else {
    parts.bar.value = state.percent;
  }
  parts.bar.setAttribute("aria-valuetext", `${Math.round(state.percent)}%, ${state.message}`);
  parts.message.textContent = state.message;
  // A failed job's last message is usually its error, shown below as the reason.
  parts.message.hidden = Boolean(state.reason) && state.message === state.reason;
  if (state.sizeBytes != null) {
    parts.sizeRow.hidden = false;
    const missing = state.missing.length ? `, missing: ${state.missing.join(", ")}` : "";
    parts.size.textContent = `${formatBytes(state.sizeBytes)}${missing}`;
  }
  parts.reason.hidden = !state.reason;
  parts.reason.textContent = state.reason ?? "";
  if (entry.actionError) {
    parts.reason.hidden = false;
    parts.reason.textContent = entry.actionError;
  }
  parts.download.hidden = !state.canDownload;
  parts.cancel.hidden = !state.canCancel;
  parts.retry.hidden = !state.canRetry;
  parts.remove.hidden = !state.finished;
  renderTimes(entry);
  renderConnection(entry);
}

function renderTimes(entry) {
  if (!entry.job) return;
  const { elapsedS, etaS } = longdl.estimate(entry.job, entry.receivedAt);
  entry.parts.elapsed.textContent = formatDuration(elapsedS);
  entry.parts.eta.textContent = longdl.isFinished(entry.job.status)
    ? "–"
    : etaS == null
      ? "estimating…"
      : formatDuration(etaS);
}

function renderConnection(entry) {
  const reconnecting = entry.connection === "reconnecting";
  entry.parts.connection.hidden = !reconnecting;
  if (reconnecting) {
    const wait = entry.retryInMs ? ` Next try in ${formatDuration(entry.retryInMs / 1000)}.` : "";
    entry.parts.connectionText.textContent = `Connection lost, reconnecting…${wait}`;
  }
}

function refreshListChrome() {
  empty.hidden = entries.size > 0;
  const anyFinished = [...entries.values()].some(
    (e) => e.gone || (e.job && longdl.isFinished(e.job.status)),
  );
  clearFinished.hidden = !anyFinished;
}

function statusSentence(entry) {
  const state = longdl.describe(entry.job);
  const name = titleOf(entry.fileIds);
  switch (state.status) {
    case "completed":
      return `${name}: ready to download.`;
    case "failed":
      return `${name} failed: ${state.reason}`;
    case "canceled":
      return `${name} was canceled.`;
    default:
      return `${name}: ${state.label.toLowerCase()}.`;
  }
}

// --- jobs ----------------------------------------------------------------------------

function addEntry(jobId, fileIds, { initial = null, restored = false } = {}) {
  const entry = {
    jobId,
    fileIds,
    job: null,
    receivedAt: Date.now(),
    connection: "connecting",
    announce: !restored,
  };
  createCard(entry);
  entries.set(jobId, entry);
  list.prepend(entry.el);
  render(entry);
  refreshListChrome();
  save();
  watchEntry(entry, initial ?? jobId);
  return entry;
}

function watchEntry(entry, job) {
  entry.stop?.();
  entry.awaitingKey = false;
  entry.stop = longdl.watch(job, (update) => onUpdate(entry, update), auth());
}

function onUpdate(entry, update) {
  const previous = entry.job?.status;
  if (update.job) {
    entry.job = update.job;
    entry.receivedAt = Date.now();
    if (!entry.fileIds?.length) entry.fileIds = update.job.fileIds;
  }
  entry.connection = update.connection;
  entry.retryInMs = update.retryInMs;
  if (isUnauthorized(update.error)) {
    // Not gone: it will be watched again once a key is saved.
    entry.awaitingKey = true;
    entry.connection = "closed";
    askForKey(update.error.message);
  } else if (update.error && update.connection === "closed") {
    // The service refused to say more about this job: usually it expired and was purged.
    entry.gone = true;
    entry.goneReason =
      update.error.status === 404
        ? "This download is no longer known to the service (finished downloads expire)."
        : update.error.message;
  }
  render(entry);
  refreshListChrome();
  const status = entry.job?.status;
  if (status && status !== previous) {
    // A restored card's first state is not news; later changes are.
    if (entry.announce || previous) announce(statusSentence(entry));
    entry.announce = true;
  }
}

function removeEntry(entry, { focus = false } = {}) {
  entry.stop?.();
  entries.delete(entry.jobId);
  entry.el.remove();
  refreshListChrome();
  save();
  if (focus) document.getElementById("jobs-heading").focus();
}

/** With a key, the result route needs a header a plain link cannot send: fetch a
 * freshly signed URL first, then follow it (it carries its own signature). */
async function downloadWithKey(event, entry) {
  if (!apiKey) return;
  event.preventDefault();
  entry.actionError = null;
  try {
    const link = await longdl.resultLink(entry.jobId, auth());
    const anchor = document.createElement("a");
    anchor.href = link.url;
    anchor.download = link.filename ?? "";
    document.body.append(anchor);
    anchor.click();
    anchor.remove();
  } catch (error) {
    if (isUnauthorized(error)) askForKey(error.message);
    entry.actionError = `Could not download: ${error.message}`;
    render(entry);
  }
}

async function cancelJob(entry) {
  const button = entry.parts.cancel;
  const hadFocus = document.activeElement === button;
  button.disabled = true;
  button.textContent = "Canceling…";
  entry.actionError = null;
  try {
    const job = await longdl.cancel(entry.jobId, auth());
    onUpdate(entry, { job, connection: entry.connection });
    // The Cancel button just disappeared; keep keyboard users on the card.
    if (hadFocus) (entry.parts.retry.hidden ? entry.parts.title : entry.parts.retry).focus();
  } catch (error) {
    if (isUnauthorized(error)) askForKey(error.message);
    entry.actionError = `Could not cancel: ${error.message}`;
    render(entry);
  } finally {
    button.disabled = false;
    button.textContent = "Cancel";
  }
}

async function retryJob(entry) {
  const button = entry.parts.retry;
  button.disabled = true;
  button.textContent = "Starting…";
  entry.actionError = null;
  try {
    const started = await longdl.initiate(entry.fileIds, auth());
    removeEntry(entry);
    const next = addEntry(started.jobId, entry.fileIds, { initial: started });
    next.parts.title.focus();
    announce(`${titleOf(entry.fileIds)}: started again.`);
  } catch (error) {
    if (isUnauthorized(error)) askForKey(error.message);
    entry.actionError = `Could not start again: ${error.message}`;
    render(entry);
    button.disabled = false;
    button.textContent = "Retry";
  }
}

// --- the form ------------------------------------------------------------------------

function showFormError(text) {
  formError.textContent = text;
  input.setAttribute("aria-invalid", text ? "true" : "false");
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const { ids, errors } = longdl.parseFileIds(input.value);
  if (errors.length) {
    showFormError(errors.slice(0, 3).join(" "));
    input.focus();
    return;
  }
  showFormError("");
  startButton.disabled = true;
  startButton.textContent = "Starting…";
  try {
    const started = await longdl.initiate(ids, {
      ...auth(),
      onRetry: (error, delayMs) =>
        showFormError(`${error.message} Trying again in ${formatDuration(delayMs / 1000)}…`),
    });
    showFormError("");
    input.value = "";
    addEntry(started.jobId, ids, { initial: started });
    announce(`Started ${titleOf(ids)}.`);
  } catch (error) {
    if (isUnauthorized(error)) {
      showFormError("This service needs an API key: save it above, then press Start again.");
      askForKey(error.message);
    } else {
      showFormError(error.message);
      input.focus();
    }
  } finally {
    startButton.disabled = false;
    startButton.textContent = "Start";
  }
});

input.addEventListener("input", () => {
  if (formError.textContent) showFormError("");
});

keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const value = keyInput.value.trim();
  if (!value) {
    keyError.textContent = "Enter the API key you were given.";
    keyInput.setAttribute("aria-invalid", "true");
    keyInput.focus();
    return;
  }
  setKey(value);
  keyInput.value = "";
  keyError.textContent = "";
  keyPanel.hidden = true;
  for (const entry of entries.values()) {
    if (entry.awaitingKey) watchEntry(entry, entry.jobId);
  }
  if (formError.textContent) showFormError("");
  input.focus();
  announce("API key saved.");
});

forgetKey.addEventListener("click", () => {
  setKey("");
  announce("API key forgotten.");
});

clearFinished.addEventListener("click", () => {
  for (const entry of [...entries.values()]) {
    if (entry.gone || (entry.job && longdl.isFinished(entry.job.status))) removeEntry(entry);
  }
  document.getElementById("jobs-heading").focus();
});

// Elapsed time and time left tick between updates.
setInterval(() => {
  for (const entry of entries.values()) {
    if (entry.job && !longdl.isFinished(entry.job.status)) renderTimes(entry);
  }
}, 1000);

// Oldest first, so the newest ends up on top.
for (const { jobId, fileIds } of loadSaved().reverse()) {
  addEntry(jobId, Array.isArray(fileIds) ? fileIds : [], { restored: true });
}
forgetKeyItem.hidden = !apiKey;
refreshListChrome();
document.documentElement.dataset.ready = "true";
