// The gateway's answers. They are not events, so they are not in schemas/v1: these mirror
// app/gateway/events.py (IngestResult), app/gateway/route.py (RouteAnswer) and the chat
// answer's `feedloop` object (app/gateway/chat.py).

/** One event the gateway refused; `index` is its position in the posted array. */
export interface RejectedEvent {
  index: number;
  event_id: string | null;
  reason: string;
  detail: string;
}

/** `POST /v1/events` answers 202 with this even when some events were refused. */
export interface IngestResult {
  accepted: number;
  rejected: number;
  errors: RejectedEvent[];
}

/** `POST /v1/route`: serve with `adapter`, and send `propensity` with the interaction. */
export interface RouteAnswer {
  adapter: string;
  propensity: number;
  probabilities: Record<string, number>;
  decision_id: string;
  snapshot_version: number;
}

/** The `feedloop` object of a chat completion from the gateway: the ids to send feedback with. */
export interface ChatIds {
  interaction_id: string;
  interaction_ids: string[];
  session_id: string;
  adapter: string;
  /** Non-streamed answers only: false when the broker could not take the interaction. */
  recorded?: boolean;
}
