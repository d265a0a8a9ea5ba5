package smapi

// The complete v5 IDL, as tables of declared (unimplemented) methods. A
// plugin starts from VolumeIDL or DatapathIDL and replaces entries with
// implementations (Table.With), so every IDL method has an entry point that
// at least answers a well-formed Unimplemented record.

// PluginIDL is the Plugin interface (both plugin kinds implement it).
func PluginIDL() Table {
	return Table{
		Declare[DbgParams]("Plugin.Query", ResultQuery),
		Declare[DbgParams]("Plugin.ls", ResultStringList),
		Declare[DbgParams]("Plugin.diagnostics", ResultString),
	}
}

// VolumeIDL is the volume plugin's interfaces: Plugin, SR and Volume.
func VolumeIDL() Table {
	return append(PluginIDL(),
		Declare[SRProbeParams]("SR.probe", ResultProbe),
		Declare[SRCreateParams]("SR.create", ResultConfiguration),
		Declare[SRAttachParams]("SR.attach", ResultString),
		Declare[SRParams]("SR.detach", ResultUnit),
		Declare[SRParams]("SR.destroy", ResultUnit),
		Declare[SRParams]("SR.stat", ResultSRStat),
		Declare[SRSetNameParams]("SR.set_name", ResultUnit),
		Declare[SRSetDescriptionParams]("SR.set_description", ResultUnit),
		Declare[SRParams]("SR.ls", ResultVolumeList),
		Declare[VolumeCreateParams]("Volume.create", ResultVolume),
		Declare[VolumeParams]("Volume.snapshot", ResultVolume),
		Declare[VolumeParams]("Volume.clone", ResultVolume),
		Declare[VolumeCopyParams]("Volume.copy", ResultVolume),
		Declare[VolumeParams]("Volume.destroy", ResultUnit),
		Declare[VolumeRevertParams]("Volume.revert", ResultUnit),
		Declare[VolumeSetNameParams]("Volume.set_name", ResultUnit),
		Declare[VolumeSetDescriptionParams]("Volume.set_description", ResultUnit),
		Declare[VolumeSetParams]("Volume.set", ResultUnit),
		Declare[VolumeUnsetParams]("Volume.unset", ResultUnit),
		Declare[VolumeResizeParams]("Volume.resize", ResultUnit),
		Declare[VolumeParams]("Volume.stat", ResultVolume),
		Declare[VolumePairParams]("Volume.compare", ResultBlocklist),
		Declare[VolumeParams]("Volume.similar_content", ResultStringList),
		Declare[VolumeParams]("Volume.enable_cbt", ResultUnit),
		Declare[VolumeParams]("Volume.disable_cbt", ResultUnit),
		Declare[VolumeParams]("Volume.data_destroy", ResultUnit),
		Declare[VolumeChangedBlocksParams]("Volume.list_changed_blocks", ResultChangedBlocks),
		Declare[VolumePairParams]("Volume.compose", ResultUnit),
	)
}

// DatapathIDL is the datapath plugin's interfaces: Plugin, Datapath, Data.
func DatapathIDL() Table {
	return append(PluginIDL(),
		Declare[DatapathOpenParams]("Datapath.open", ResultUnit),
		Declare[DatapathParams]("Datapath.attach", ResultBackend),
		Declare[DatapathParams]("Datapath.activate", ResultUnit),
		Declare[DatapathParams]("Datapath.activate_readonly", ResultUnit),
		Declare[DatapathParams]("Datapath.deactivate", ResultUnit),
		Declare[DatapathParams]("Datapath.detach", ResultUnit),
		Declare[DatapathCloseParams]("Datapath.close", ResultUnit),
		Declare[DatapathParams]("Datapath.import_activate", ResultString),
		Declare[DataCopyParams]("Data.copy", ResultOperation),
		Declare[DataMirrorParams]("Data.mirror", ResultOperation),
		Declare[DataOperationParams]("Data.stat", ResultDataStatus),
		Declare[DataOperationParams]("Data.cancel", ResultUnit),
		Declare[DataOperationParams]("Data.destroy", ResultUnit),
		Declare[DbgParams]("Data.ls", ResultOperationList),
	)
}
