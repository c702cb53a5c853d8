"""memfabric"""
