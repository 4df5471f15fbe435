# Defaults are the names `flowcraft provision aws` and the workers use when nothing else
# is configured (flags or FLOWCRAFT_* variables). Change them together with the workers'
# settings. The payload bucket is the claim check's, on only where the workers name it
# (FLOWCRAFT_PAYLOAD_BUCKET).

variable "queue_name" {
  description = "SQS job queue (FLOWCRAFT_QUEUE_NAME); the dead-letter queue is <name>-dlq"
  type        = string
  default     = "flowcraft-jobs"
}

variable "context_table_name" {
  description = "DynamoDB table of run contexts, key runId (FLOWCRAFT_CONTEXT_TABLE)"
  type        = string
  default     = "flowcraft-contexts"
}

variable "status_table_name" {
  description = "DynamoDB table of run statuses, key runId (FLOWCRAFT_STATUS_TABLE)"
  type        = string
  default     = "flowcraft-statuses"
}

variable "coordination_table_name" {
  description = "DynamoDB table of coordination records, key `key`, TTL on `ttl` (FLOWCRAFT_COORDINATION_TABLE)"
  type        = string
  default     = "flowcraft-coordination"
}

variable "payload_bucket_name" {
  description = "S3 bucket of the claim check, for values too large for a run's item (FLOWCRAFT_PAYLOAD_BUCKET); bucket names are global: choose your own"
  type        = string
}

variable "payload_expiry_days" {
  description = "Days after which the claim check's objects expire: the run retention (30 days)"
  type        = number
  default     = 30
}

variable "lease_seconds" {
  description = "The queue's visibility timeout: the workers' --lease-seconds"
  type        = number
  default     = 60
}

variable "max_receive_count" {
  description = "Deliveries before SQS moves a message to the dead-letter queue; keep it above the workers' max_receive_count (5)"
  type        = number
  default     = 10
}

variable "point_in_time_recovery" {
  description = "Point-in-time recovery for the run tables"
  type        = bool
  default     = true
}

variable "tags" {
  description = "Tags for every resource"
  type        = map(string)
  default     = {}
}
