export { FeedloopClient } from "./client.js";
export type { AnnotationFields, ClientOptions, FeedbackFields, InteractionFields, InteractionRef } from "./client.js";
export { FeedloopError } from "./errors.js";
export type { ChatIds, IngestResult, RejectedEvent, RouteAnswer } from "./answers.js";
export type { RetryPolicy } from "./retry.js";
export type * from "./schemas.js";
