# Defaults for the queue, database and containers are the names `flowcraft provision
# azure` and the workers use when nothing else is configured (flags or FLOWCRAFT_*
# variables); the payload container is the claim check's, which is on only where the
# workers name it (FLOWCRAFT_PAYLOAD_CONTAINER). The account names must be unique across
# Azure: choose your own.

variable "resource_group_name" {
  description = "An existing resource group"
  type        = string
}

variable "location" {
  description = "Azure region, e.g. westeurope"
  type        = string
}

variable "storage_account_name" {
  description = "Storage account for the job queue and the claim check's blobs (3-24 lower-case letters and digits, unique)"
  type        = string
}

variable "cosmos_account_name" {
  description = "Cosmos DB account (unique)"
  type        = string
}

variable "redis_name" {
  description = "Azure Cache for Redis (unique)"
  type        = string
}

variable "queue_name" {
  description = "Job queue (FLOWCRAFT_QUEUE_NAME); poison messages go to <name>-poison"
  type        = string
  default     = "flowcraft-jobs"
}

variable "database_name" {
  description = "Cosmos DB database (FLOWCRAFT_COSMOS_DATABASE)"
  type        = string
  default     = "flowcraft-db"
}

variable "context_container_name" {
  description = "Container of run contexts, partition key /runId (FLOWCRAFT_CONTEXT_CONTAINER)"
  type        = string
  default     = "contexts"
}

variable "status_container_name" {
  description = "Container of run statuses, partition key /runId (FLOWCRAFT_STATUS_CONTAINER)"
  type        = string
  default     = "statuses"
}

variable "payload_container_name" {
  description = "Blob container of the claim check, for values too large for a run's item (FLOWCRAFT_PAYLOAD_CONTAINER)"
  type        = string
  default     = "flowcraft-payloads"
}

variable "payload_expiry_days" {
  description = "Days after which the claim check's blobs are deleted: the run retention (30 days)"
  type        = number
  default     = 30
}

variable "max_throughput" {
  description = "Autoscale ceiling (RU/s) of each container"
  type        = number
  default     = 1000
}

variable "redis_sku" {
  description = "Basic, Standard or Premium"
  type        = string
  default     = "Basic"
}

variable "tags" {
  description = "Tags for every resource"
  type        = map(string)
  default     = {}
}
