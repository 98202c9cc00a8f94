#![allow(dead_code)]
pub mod agent;
pub mod deploy;
pub mod frames;
