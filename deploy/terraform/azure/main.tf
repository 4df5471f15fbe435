# What flowcraft's Azure workers need: a storage queue (and the -poison queue Azure
# Functions and the workers move unprocessable messages to), the blob container of the
# claim check, a Cosmos DB (SQL API) database with the contexts and statuses containers
# partitioned on /runId, and a Redis cache for coordination. The names and keys are those
# `flowcraft provision azure` uses.

terraform {
  required_version = ">= 1.3"
  required_providers {
    azurerm = {
      source  = "hashicorp/azurerm"
      version = ">= 4.9, < 5.0" # storage_account_id on queues
    }
  }
}

resource "azurerm_storage_account" "main" {
  name                     = var.storage_account_name
  resource_group_name      = var.resource_group_name
  location                 = var.location
  account_tier             = "Standard"
  account_replication_type = "LRS"
  min_tls_version          = "TLS1_2"
  tags                     = var.tags
}

resource "azurerm_storage_queue" "jobs" {
  name                 = var.queue_name
  storage_account_id = azurerm_storage_account.main.id
}

resource "azurerm_storage_queue" "poison" {
  name                 = "${var.queue_name}-poison"
  storage_account_id = azurerm_storage_account.main.id
}

# The claim check: context values too large for a run's item (over 32 KiB of JSON) are
# blobs flowcraft/<runId>/<sha256>, and the item holds references to them.
resource "azurerm_storage_container" "payloads" {
  name                  = var.payload_container_name
  storage_account_id    = azurerm_storage_account.main.id
  container_access_type = "private"
}

# They expire with the runs (counted from when they were written); `flowcraft provision`
# cannot set this: it is the storage account's management policy.
resource "azurerm_storage_management_policy" "payloads" {
  storage_account_id = azurerm_storage_account.main.id
  rule {
    name    = "flowcraft-payload-expiry"
    enabled = true
    filters {
      prefix_match = ["${var.payload_container_name}/flowcraft/"]
      blob_types   = ["blockBlob"]
    }
    actions {
      base_blob {
        delete_after_days_since_modification_greater_than = var.payload_expiry_days
      }
    }
  }
}

resource "azurerm_cosmosdb_account" "main" {
  name                = var.cosmos_account_name
  resource_group_name = var.resource_group_name
  location            = var.location
  offer_type          = "Standard"
  kind                = "GlobalDocumentDB"
  # Workers read their own writes on the run's item (claim, then commit).
  consistency_policy {
    consistency_level = "Session"
  }
  geo_location {
    location          = var.location
    failover_priority = 0
  }
  tags = var.tags
}

resource "azurerm_cosmosdb_sql_database" "main" {
  name                = var.database_name
  resource_group_name = azurerm_cosmosdb_account.main.resource_group_name
  account_name        = azurerm_cosmosdb_account.main.name
}

# One item per run: its context and the engine's records of the nodes.
resource "azurerm_cosmosdb_sql_container" "contexts" {
  name                = var.context_container_name
  resource_group_name = azurerm_cosmosdb_account.main.resource_group_name
  account_name        = azurerm_cosmosdb_account.main.name
  database_name       = azurerm_cosmosdb_sql_database.main.name
  partition_key_paths = ["/runId"]
  autoscale_settings {
    max_throughput = var.max_throughput
  }
}

# One status record per run; the reconciler queries it.
resource "azurerm_cosmosdb_sql_container" "statuses" {
  name                = var.status_container_name
  resource_group_name = azurerm_cosmosdb_account.main.resource_group_name
  account_name        = azurerm_cosmosdb_account.main.name
  database_name       = azurerm_cosmosdb_sql_database.main.name
  partition_key_paths = ["/runId"]
  autoscale_settings {
    max_throughput = var.max_throughput
  }
}

# Coordination records (any-join arrivals, failure markers); keys expire by themselves.
resource "azurerm_redis_cache" "main" {
  name                 = var.redis_name
  resource_group_name  = var.resource_group_name
  location             = var.location
  capacity             = 0
  family               = "C"
  sku_name             = var.redis_sku
  non_ssl_port_enabled = false
  minimum_tls_version  = "1.2"
  tags                 = var.tags
}
