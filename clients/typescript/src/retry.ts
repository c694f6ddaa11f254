/**
 * When to try a request again, and how long to wait first.
 *
 * 429 (over the app's rate limit), 502, 503 (broker down) and 504 are transient; every other
 * 4xx is a mistake in the request and retrying it would only repeat the refusal. Retrying
 * events is safe because their ids are fixed when they are created: feedloop counts a
 * re-sent event once.
 */
export const RETRYABLE_STATUSES: ReadonlySet<number> = new Set([429, 502, 503, 504]);

export interface RetryPolicy {
  /** Tries after the first one. */
  retries: number;
  /** The backoff's first step; each retry doubles it. */
  baseDelayMs: number;
  /** The longest backoff; a Retry-After beyond it fails the request instead of stalling it. */
  maxDelayMs: number;
}

export const DEFAULT_RETRY: RetryPolicy = { retries: 4, baseDelayMs: 200, maxDelayMs: 30_000 };

/** Retry-After in milliseconds (delta-seconds or an HTTP date), or undefined. */
export function retryAfterMs(header: string | null, now: number = Date.now()): number | undefined {
  if (header === null || header.trim() === "") return undefined;
  const seconds = Number(header);
  if (Number.isFinite(seconds)) return Math.max(0, seconds * 1000);
  const date = Date.parse(header);
  return Number.isNaN(date) ? undefined : Math.max(0, date - now);
}

/**
 * The wait before retry number `attempt` (0-based). Full jitter, so that many clients
 * refused at once do not come back at once; with a Retry-After, that long plus jitter, for
 * the same reason.
 */
export function delayMs(attempt: number, policy: RetryPolicy, retryAfter?: number,
                        random: () => number = Math.random): number {
  if (retryAfter !== undefined) return retryAfter + random() * policy.baseDelayMs;
  return random() * Math.min(policy.maxDelayMs, policy.baseDelayMs * 2 ** attempt);
}

export const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));
