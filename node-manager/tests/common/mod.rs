#![allow(dead_code)]
pub mod agent;
pub mod frames;
pub mod kernel;
