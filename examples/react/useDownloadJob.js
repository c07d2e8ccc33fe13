// useDownloadJob: a React hook for longdl download jobs, built on longdl-client.js.
//
// No build step is needed to read it; in an app, bundle it as any other module. Copy
// longdl-client.js next to it (longdl serves it at /ui/longdl-client.js).
//
//   const { start, cancel, job, state, connection, error, downloadUrl } = useDownloadJob();
//   <button onClick={() => start([70000, 70007])}>Download</button>
//   {state && <progress max="100" value={state.percent} />}
//   {downloadUrl && <a href={downloadUrl}>Save the ZIP</a>}
//
// Pass { jobId } to follow a job started elsewhere (say, one kept in localStorage), and
// { baseUrl } when the API lives on another origin (it must allow yours in CORS_ORIGINS).
import { useCallback, useEffect, useMemo, useState } from "react";
import { cancel as cancelJob, describe, initiate, resultUrl, watch } from "./longdl-client.js";

/**
 * Start, follow and cancel one download job.
 *
 * @param {{jobId?: string, baseUrl?: string, token?: string}} [options]
 * @returns {{
 *   jobId: string|null,
 *   job: object|null,            // the latest job resource
 *   state: object|null,          // describe(job): label, percent, canCancel, canDownload, …
 *   connection: string,          // "idle", "connecting", "live", "reconnecting", "closed"
 *   error: Error|null,           // why starting, canceling or watching failed
 *   downloadUrl: string|null,    // set once the job completed
 *   start: (fileIds: number[]) => Promise<string|null>,
 *   cancel: () => Promise<void>,
 * }}
 */
export function useDownloadJob(options = {}) {
  const { baseUrl, token } = options;
  const [jobId, setJobId] = useState(options.jobId ?? null);
  const [job, setJob] = useState(null);
  const [connection, setConnection] = useState("idle");
  const [error, setError] = useState(null);

  // Follow the current job; watch() returns its own cleanup (it closes the stream).
  useEffect(() => {
    if (!jobId) return undefined;
    setConnection("connecting");
    return watch(
      jobId,
      (update) => {
        if (update.job) setJob(update.job);
        setConnection(update.connection);
        if (update.error) setError(update.error);
      },
      { baseUrl, token },
    );
  }, [jobId, baseUrl, token]);

  const start = useCallback(
    async (fileIds) => {
      setError(null);
      setJob(null);
      try {
        const started = await initiate(fileIds, { baseUrl, token });
        setJobId(started.jobId);
        return started.jobId;
      } catch (failure) {
        setError(failure); // failure.message is the service's problem detail
        return null;
      }
    },
    [baseUrl, token],
  );

  const cancel = useCallback(async () => {
    if (!jobId) return;
    try {
      setJob(await cancelJob(jobId, { baseUrl, token }));
    } catch (failure) {
      setError(failure);
    }
  }, [jobId, baseUrl, token]);

  const state = useMemo(() => (job ? describe(job) : null), [job]);
  const downloadUrl = state?.canDownload ? resultUrl(job, { baseUrl }) : null;

  return { jobId, job, state, connection, error, downloadUrl, start, cancel };
}
