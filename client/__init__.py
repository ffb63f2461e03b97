"""The hospital site: Flower ClientApp, local DP training and the site's privacy ledger."""
