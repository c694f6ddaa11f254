import type { IngestResult, RouteAnswer } from "./answers.js";
import { errorOf } from "./errors.js";
import { DEFAULT_RETRY, RETRYABLE_STATUSES, type RetryPolicy, delayMs, retryAfterMs, sleep } from "./retry.js";
import type { Annotation, Context, Feedback, Interaction, UserEvent } from "./schemas.js";

export interface ClientOptions {
  /** The gateway, e.g. "https://feedloop.example.com". */
  baseUrl: string;
  /** The app's secret API key. Server side only: never ship it to a browser. */
  apiKey: string;
  appId: string;
  /** Per request; a request that times out is retried like a 503. */
  timeoutMs?: number;
  retry?: Partial<RetryPolicy>;
  /** Defaults to the platform's fetch; pass one to add a proxy or instrumentation. */
  fetch?: typeof fetch;
}

/** Set by the builders (type, app; the event id and time unless given) or left to the contract (schema_version). */
type Filled = "event_id" | "occurred_at" | "app_id" | "type" | "schema_version";

export type InteractionFields = Omit<Interaction, Filled | "interaction_id"> & Partial<Pick<Interaction, "interaction_id" | "event_id" | "occurred_at">>;
export type FeedbackFields = Omit<Feedback, Filled | "interaction_id" | "kind"> & Partial<Pick<Feedback, "event_id" | "occurred_at">>;
export type AnnotationFields = Omit<Annotation, Filled | "interaction_id"> & Partial<Pick<Annotation, "event_id" | "occurred_at">>;

/**
 * What feedback is about: an interaction id, or anything that carries one and its session
 * (an Interaction from `interaction()`, or the `feedloop` object of a gateway chat answer).
 * The session matters when the app names its own sessions: feedback without it is routed by
 * the gateway's default session and never meets its interaction.
 */
export type InteractionRef = string | { interaction_id: string; session_id?: string };

function refFields(about: InteractionRef): { interaction_id: string; session_id?: string } {
  if (typeof about === "string") return { interaction_id: about };
  const { interaction_id, session_id } = about;
  return session_id === undefined ? { interaction_id } : { interaction_id, session_id };
}

/**
 * Sends a chat app's interactions and feedback to a feedloop gateway (`POST /v1/events`) and
 * asks it which adapter should answer (`POST /v1/route`).
 *
 * Events are built first and sent after: the builders fix each event's id and time when the
 * event happens, so a retry, or a resend after a crash, carries the same ids and feedloop
 * counts it once.
 */
export class FeedloopClient {
  readonly appId: string;
  private readonly baseUrl: string;
  private readonly apiKey: string;
  private readonly timeoutMs: number;
  private readonly retry: RetryPolicy;
  private readonly fetch: typeof fetch;

  constructor(options: ClientOptions) {
    this.baseUrl = options.baseUrl.replace(/\/+$/, "");
    this.apiKey = options.apiKey;
    this.appId = options.appId;
    this.timeoutMs = options.timeoutMs ?? 10_000;
    this.retry = { ...DEFAULT_RETRY, ...options.retry };
    // Bound, because some platforms' fetch throws when called as a method of another object.
    this.fetch = options.fetch ?? globalThis.fetch.bind(globalThis);
  }

  /** An interaction event; its interaction id, event id and time are filled in unless given. */
  interaction(fields: InteractionFields): Interaction {
    return { interaction_id: crypto.randomUUID(), ...this.stamp(), type: "interaction", ...fields };
  }

  /** Feedback of `kind` on an interaction; see docs/events.md for which fields each kind takes. */
  feedback(about: InteractionRef, kind: Feedback["kind"], fields: FeedbackFields = {}): Feedback {
    return { ...this.stamp(), type: "feedback", ...refFields(about), kind, ...fields };
  }

  /** A thumbs up (`up`) or down. */
  thumbs(about: InteractionRef, up: boolean, fields: FeedbackFields = {}): Feedback {
    return this.feedback(about, "thumbs", { ...fields, value: up ? 1 : -1 });
  }

  /** A reviewer's or a judge's label on an interaction. */
  annotation(about: InteractionRef, fields: AnnotationFields): Annotation {
    return { ...this.stamp(), type: "annotation", ...refFields(about), ...fields };
  }

  /**
   * Posts events. The answer counts those accepted and says why each other one was refused
   * (a refused event does not throw: the rest of the batch is in). Throws FeedloopError on
   * a refused request (401 bad key, 413, 422) or when retries run out.
   */
  async sendEvents(events: readonly UserEvent[]): Promise<IngestResult> {
    const response = await this.post("/v1/events", events, this.retry.retries);
    if (response.status !== 202) throw await errorOf(response);
    return (await response.json()) as IngestResult;
  }

  /**
   * Which adapter should serve a request with this context, and with what propensity (send
   * both with its interaction). Not retried: a chat request should not wait on routing. On
   * an error, serve your default adapter with propensity 1.0 (no choice was made).
   */
  async route(context: Context = {}): Promise<RouteAnswer> {
    const response = await this.post("/v1/route", { context, app_id: this.appId }, 0);
    if (response.status !== 200) throw await errorOf(response);
    return (await response.json()) as RouteAnswer;
  }

  private stamp(): { event_id: string; occurred_at: string; app_id: string } {
    return { event_id: crypto.randomUUID(), occurred_at: new Date().toISOString(), app_id: this.appId };
  }

  /** The last answer; network errors and timeouts are retried, and rethrown when retries run out. */
  private async post(path: string, body: unknown, retries: number): Promise<Response> {
    const payload = JSON.stringify(body);
    for (let attempt = 0; ; attempt++) {
      let retryAfter: number | undefined;
      try {
        const response = await this.fetch(this.baseUrl + path, {
          method: "POST",
          headers: { Authorization: `Bearer ${this.apiKey}`, "Content-Type": "application/json" },
          body: payload,
          signal: AbortSignal.timeout(this.timeoutMs),
        });
        if (!RETRYABLE_STATUSES.has(response.status) || attempt >= retries) return response;
        retryAfter = retryAfterMs(response.headers.get("Retry-After"));
        // Asked to wait longer than we would: the caller hears it now rather than stalling.
        if (retryAfter !== undefined && retryAfter > this.retry.maxDelayMs) return response;
        await response.body?.cancel(); // frees the connection while we wait
      } catch (error) {
        if (attempt >= retries) throw error;
      }
      await sleep(delayMs(attempt, this.retry, retryAfter));
    }
  }
}
