#![allow(dead_code)]
pub mod frames;
